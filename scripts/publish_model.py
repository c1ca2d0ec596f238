"""Publish a trained model as the bundle's ``models/model.pt`` (the state_dict of ``network_def``).

    python -m scripts.publish_model --checkpoint <train_out>/cv/model.pt [--out models/model.pt]
    python -m monai.bundle run publish --config_file configs/train.json --output_dir <train_out>   # the same

``<train_out>/cv/model.pt`` is the cross-validation fold with the best validation AUC (written by the
training workflow); any ``fold<k>/model.pt`` works too. The checkpoint's network must be the one that
``network_def`` in ``configs/inference.json`` builds (same class and settings); otherwise this stops
and says which setting differs, because a state_dict does not carry SMILE's threshold and factor.
Afterwards the Model Zoo tools work on the bundle::

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \
        --meta_file configs/metadata.json --config_file configs/inference.json

Inference can still average all folds (``--checkpoints <train_out>/cv``); ``models/model.pt`` is the
single model that a Model Zoo user downloads.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from scripts.io_utils import atomic_path, write_json

logger = logging.getLogger(__name__)


def build_network_def(config_file: str | Path = "configs/inference.json", bundle_root: str | Path = "."):
    """``network_def`` of a bundle config, as ``monai.bundle`` builds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_root)
    return parser.get_parsed_content("network_def")


def publish_model(
    checkpoint: str | Path,
    out: str | Path = "models/model.pt",
    config_file: str | Path = "configs/inference.json",
    bundle_root: str | Path = ".",
) -> Path:
    """Load a training checkpoint into ``network_def`` (strictly) and save that network's state_dict."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; run training first "
                                "(configs/train.json writes <output_dir>/cv/model.pt)")
    data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = data["model"] if isinstance(data, dict) and isinstance(data.get("model"), dict) else data
    spec = data.get("network") if isinstance(data, dict) else None
    net = build_network_def(config_file, bundle_root)
    mine = getattr(getattr(net, "mil", None), "config", None)
    if isinstance(spec, dict) and isinstance(mine, dict):
        kwargs = dict(spec.get("kwargs") or {})
        trained_class = str(spec.get("class", "")).rsplit(".", 1)[-1]
        if trained_class and trained_class != type(net.mil).__name__:
            raise ValueError(f"{checkpoint} holds a {trained_class}, but network_def in {config_file} builds a "
                             f"{type(net.mil).__name__}; edit mil_network there")
        differ = {k: (kwargs[k], mine[k]) for k in kwargs if k in mine and not _same(kwargs[k], mine[k])}
        if differ:
            detail = ", ".join(f"{k}: trained {a!r} vs config {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"network settings of {checkpoint} differ from mil_network in {config_file} ({detail}); "
                             "set them in the config so the published model behaves as trained")
    try:
        net.load_mil_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{checkpoint} does not fit network_def of {config_file}: {error}") from error
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(net.state_dict(), tmp)
    info = {k: v for k, v in (data.items() if isinstance(data, dict) else []) if k != "model"}
    write_json(out.with_name(out.stem + "_info.json"), {"source": str(checkpoint), **info})
    logger.info("published %s -> %s", checkpoint, out)
    return out


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def main(checkpoint: str, out: str = "models/model.pt", config_file: str = "configs/inference.json") -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = publish_model(checkpoint, out, config_file)
    print(f"wrote {path} (state_dict of network_def in {config_file})")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
