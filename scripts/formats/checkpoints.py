"""Fold checkpoints, published models and weights files: the one place that writes, reads and finds them.

File formats (both plain ``torch.save`` dicts that ``torch.load(..., weights_only=True)`` reads):

* a **fold checkpoint** (``<train_out>/cv/fold<k>/model.pt``, ``<train_out>/cv/model.pt``,
  ``<train_out>/final/model.pt``)::

      {"model": state_dict of the MIL network,
       "network": {"name": registered MIL name, "class": "module.Class", "kwargs": {...}},
       "format": "smile-fold-checkpoint", "format_version": 1,
       "metadata": {...free-form: train/val slide and patient ids, per-slide file fingerprints
                    ("training_slides", "fingerprint_method": scripts.workflows.training.data_provenance), ...},
       ...top-level numbers/strings: fold, threshold, best_epoch, val_auc, feature_dim}

  It is also what MONAI's ``CheckpointLoader(load_dict={"model": net})`` reads.
* a **published model** (``models/model.pt``): the state_dict of ``network_def`` in
  ``configs/inference.json`` (what the Model Zoo tools load), with ``model_info.json`` beside it.

Safety: every file is loaded with ``torch.load(weights_only=True)``, so it may hold only tensors,
numbers, strings, lists, tuples and dicts; loading one can never run code. A file that needs general
unpickling (a pickled object inside) is refused with a :class:`UntrustedCheckpointError` naming the file.
If you made that file yourself and trust it, pass ``--trust_checkpoint true`` (any bundle command, or
``SMILE_TRUST_CHECKPOINT=1``); the full unpickling is then logged as a warning.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from scripts.formats.layout import OutputLayout
from scripts.utils.errors import BundleError
from scripts.utils.io_utils import atomic_path, write_json

logger = logging.getLogger(__name__)

FORMAT = "smile-fold-checkpoint"
FORMAT_VERSION = 1
TRUST_OVERRIDE = "--trust_checkpoint true"


class CheckpointError(BundleError, ValueError):
    """No usable model checkpoint; the message names the path and what to do."""


class UntrustedCheckpointError(CheckpointError):
    """A file that only full unpickling could read (it could run code); refused unless trusted."""


# ------------------------------------------------------------------------------------------------ loading
def trust_requested(argv: Sequence[str] | None = None) -> bool:
    """True when the user passed ``--trust_checkpoint true`` (or ``SMILE_TRUST_CHECKPOINT=1``)."""
    if os.environ.get("SMILE_TRUST_CHECKPOINT", "").strip().lower() not in ("", "0", "false", "no"):
        return True
    argv = sys.argv if argv is None else list(argv)
    for i, arg in enumerate(argv):
        if arg == "--trust_checkpoint":
            value = argv[i + 1].lower() if i + 1 < len(argv) else "true"
            return value in ("true", "1", "yes")
        if arg.startswith("--trust_checkpoint="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
    return False


def load_file(path: str | Path, trust: bool | None = None, what: str = "checkpoint") -> Any:
    """``torch.load`` ``path`` on the CPU with ``weights_only=True``.

    A file that needs full unpickling raises :class:`UntrustedCheckpointError` (nothing in it is run),
    unless ``trust`` (None: :func:`trust_requested`) is true; then it is unpickled and a warning logged.
    A missing or unreadable file is a :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not (trust_requested() if trust is None else trust):
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UntrustedCheckpointError(
                f"refused to load {what} {path}: it holds pickled Python objects, which could run code when "
                f"loaded ({detail[:200]}). Bundle checkpoints hold only tensors, numbers, strings, lists and "
                f"dicts. If you made this file yourself and trust it, add {TRUST_OVERRIDE} to the command "
                "(or set SMILE_TRUST_CHECKPOINT=1)."
            ) from None
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from error
    logger.warning("loading %s %s with full unpickling (trusted by %s)", what, path, TRUST_OVERRIDE)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from error


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def read_checkpoint(path: str | Path, trust: bool | None = None) -> dict:
    """A fold checkpoint or published model as ``{"model": state_dict, "network": spec or None, ...}``.

    A bare state_dict (``models/model.pt``) gets the extras of its ``<stem>_info.json`` (written by
    :func:`publish_state_dict`). Anything else is a :class:`CheckpointError`.
    """
    path = Path(path)
    data = load_file(path, trust)
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        checkpoint = dict(data)
    elif _is_state_dict(data):
        checkpoint = {"model": dict(data)}
        info = path.with_name(path.stem + "_info.json")
        if info.is_file():
            try:
                extras = json.loads(info.read_text())
            except ValueError as error:
                raise CheckpointError(f"{info}: not valid JSON ({error}); re-run publish") from error
            checkpoint.update({k: v for k, v in extras.items() if k != "model"})
    else:
        raise CheckpointError(f"{path} holds no state_dict (expected a fold checkpoint written by training, or "
                              "models/model.pt written by publish)")
    if not _is_state_dict(checkpoint["model"]):
        raise CheckpointError(f"{path}: 'model' is not a state_dict of tensors")
    checkpoint.setdefault("network", None)
    checkpoint.setdefault("metadata", {})
    return checkpoint


def load_weights_file(path: str | Path, help_text: str = "", trust: bool | None = None) -> Any:
    """An encoder weights file (``weights_only=True``; see :func:`load_file`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder weights file {path} not found. {help_text}".strip())
    return load_file(path, trust, what="encoder weights")


# ------------------------------------------------------------------------------------------------ saving
def save_checkpoint(
    path: str | Path, model: nn.Module, metadata: Mapping[str, Any] | None = None, *, network: Mapping, **extra,
) -> Path:
    """Write a fold checkpoint atomically: the MIL network's weights, its spec (``network``: what
    :func:`scripts.networks.methods.network_spec` returns), ``metadata`` (free-form dict: encoder, slide ids, ...) and ``extra`` top-level
    values. Values are reduced to what ``weights_only=True`` loads (tensors, numbers, strings, lists, dicts).
    """
    inner = mil_of(model)
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    checkpoint = {
        "model": state, "network": plain_value(dict(network)), "format": FORMAT, "format_version": FORMAT_VERSION,
        "metadata": plain_value(dict(metadata or {})), **plain_value(extra),
    }  # fmt: skip
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Re-save the checkpoint ``source`` as ``target`` (atomically, after a safe load)."""
    data = load_file(source)
    with atomic_path(target) as tmp:
        torch.save(data, tmp)
    return Path(target)


def publish_state_dict(network: nn.Module, out: str | Path, info: Mapping[str, Any]) -> Path:
    """``models/model.pt``: ``network``'s state_dict, plus ``<stem>_info.json`` with ``info``."""
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
    write_json(out.with_name(out.stem + "_info.json"), plain_value(dict(info)))
    return out


# ------------------------------------------------------------------------------------------------ building
def load_into_network(path: str | Path, network_def: nn.Module, trust: bool | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``network_def`` with the weights of checkpoint ``path`` (strict), in eval mode.

    The checkpoint's network (class and settings, when it records them) must be the one ``network_def``
    builds; otherwise a :class:`CheckpointError` says which setting differs, since weights alone do not
    carry e.g. SMILE's threshold and factor. Returns (model, checkpoint without the weights).
    """
    checkpoint = read_checkpoint(path, trust)
    check_network_matches(checkpoint.get("network"), network_def, path)
    model = copy.deepcopy(network_def)
    load_state(model, checkpoint["model"], path)
    return model.eval(), {k: v for k, v in checkpoint.items() if k != "model"}


def check_network_matches(spec: Mapping | None, network_def: nn.Module, source: Any = "checkpoint") -> None:
    """Raise :class:`CheckpointError` when the recorded network ``spec`` differs from ``network_def``'s."""
    if not isinstance(spec, Mapping):
        return
    mine = mil_of(network_def)
    trained_class = str(spec.get("class") or "").rsplit(".", 1)[-1]
    if trained_class and trained_class != type(mine).__name__:
        raise CheckpointError(f"{source} holds a {trained_class}, but network_def builds a {type(mine).__name__}; "
                              "set the same network (mil_network / network_def#name) in the config")
    config = getattr(mine, "config", None)
    if not isinstance(config, Mapping):
        return
    kwargs = dict(spec.get("kwargs") or {})
    differ = {k: (kwargs[k], config[k]) for k in kwargs if k in config and not _same(kwargs[k], config[k])}
    if differ:
        detail = ", ".join(f"{k}: trained {a!r} vs config {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"network settings of {source} differ from network_def ({detail}); set them in the "
                              "config so the network behaves as trained")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Any) -> None:
    try:
        if hasattr(model, "load_mil_state_dict"):
            model.load_mil_state_dict(state, strict=True)
        else:
            model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the network ({type(model).__name__}); was it trained with "
                              f"other network settings? {str(error)[:500]}") from error


# ------------------------------------------------------------------------------------------------ finding
def fold_number(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def find_fold_checkpoints(models_dir: str | Path) -> list[Path]:
    """``fold<k>/model.pt`` under ``models_dir`` (a training run's ``cv/`` folder), in fold order."""
    models_dir = Path(models_dir)
    paths = sorted(models_dir.glob("fold*/model.pt"), key=lambda p: fold_number(p.parent.name))
    if not paths:
        raise CheckpointError(f"no fold models (fold<k>/model.pt) under {models_dir}; pass --models_dir "
                              "<training output_dir>/cv")
    return paths


def resolve_checkpoints(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand ``checkpoints`` (a file, a training ``cv/`` or output folder of ``fold*/model.pt``, or a
    list of them) into checkpoint files."""
    items = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            folds = sorted(path.glob("fold*/model.pt"), key=lambda p: fold_number(p.parent.name))
            if not folds and OutputLayout(path).cv_dir.is_dir():
                folds = sorted(OutputLayout(path).cv_dir.glob("fold*/model.pt"), key=lambda p: fold_number(p.parent.name))
            if not folds and (path / "model.pt").is_file():
                folds = [path / "model.pt"]
            if not folds:
                raise CheckpointError(f"no fold*/model.pt or model.pt under {path}; train first "
                                      "(configs/train.json) or pass --checkpoints <file>")
            found.extend(folds)
        else:
            raise CheckpointError(f"checkpoint {path} does not exist; train first (configs/train.json writes "
                                  "<output_dir>/cv/fold<k>/model.pt), publish one to models/model.pt "
                                  "(python -m monai.bundle run publish ...), or pass --checkpoints <path>")
    if not found:
        raise CheckpointError("no checkpoints given; pass --checkpoints <file or folder>")
    return found


# ------------------------------------------------------------------------------------------------ helpers
def mil_of(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    inner = getattr(model, "mil", None)  # BagClassifier
    return inner if isinstance(inner, nn.Module) else model


def plain_value(value: Any) -> Any:
    """``value`` reduced to what ``weights_only=True`` loads (tensors, numbers, strings, lists, dicts)."""
    if isinstance(value, (str, int, float, bool)) or value is None or torch.is_tensor(value):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain_value(v) for v in value]
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return str(value)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


__all__ = [
    "FORMAT", "FORMAT_VERSION", "CheckpointError", "UntrustedCheckpointError", "trust_requested", "load_file",
    "read_checkpoint", "load_weights_file", "save_checkpoint", "copy_checkpoint",
    "publish_state_dict", "load_into_network", "load_state", "mil_of", "plain_value", "check_network_matches",
    "find_fold_checkpoints", "resolve_checkpoints", "fold_number",
]  # fmt: skip
