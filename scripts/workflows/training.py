"""Training MIL networks on packed bags with MONAI's ignite engines, one fold or a whole cross-validation.

There is one trainer: :func:`train_from_config`, which instantiates ``configs/train.json``'s ``train``
and ``validate`` sections (``train#trainer``, ``validate#evaluator`` and all their handlers) for one
fold and restores the epoch chosen by ``validate#selection``. ``run training`` (:func:`config_cross_validation`),
``train_all``, the method comparison, the SMILE ablation and the cross-centre transfer
(``configs/compare.json``) all train through it, so a handler, ``val_interval`` or ``--tracking mlflow``
set in the config reaches every one of them.

Python API (a thin layer over the same config path)::

    from scripts.networks import build_mil_network
    from scripts.engines.mil import predict
    from scripts.workflows.training import TrainSettings, train_fold, run_cross_validation, training_parser

    factory = functools.partial(build_mil_network, "smile", factor=0.5)   # called as factory(in_dim=D)
    model, history = train_fold(factory, train_bags, val_bags, TrainSettings(epochs=50))
    probs = predict(model, test_bags)
    result = run_cross_validation(factory, bags, splits, TrainSettings(), output_dir="out")
    parser = training_parser({"epochs": 50, "lr": 1e-3})   # configs/train.json with overrides, e.g. for
    # scripts.experiments.compare.compare_methods(..., parser=parser)

* a *network factory* is any callable ``factory(in_dim=D) -> MILNetwork`` (a class, a
  ``functools.partial`` of :func:`scripts.networks.build_mil_network`, a config item with
  ``"_mode_": "callable"``) or an ``nn.Module`` instance (deep-copied for every fold); it replaces
  ``train#network`` of ``train.json``;
* :class:`TrainSettings` is the Python spelling of ``train.json``'s training keys (epochs, batch size,
  optimiser factory, loss, early stopping, seed, device); :meth:`TrainSettings.config_overrides` turns it
  into config overrides. Its defaults are ``train.json``'s, the SMILE recipe: Ranger 20.4.11
  (:class:`scripts.optim.Ranger`) lr 2e-4, weight decay 1e-5, 100 epochs, batches of 12 bags, early
  stopping and checkpoint selection on the validation AUC (ties broken by the lower validation loss);
* a network's extra training losses (``training_loss_terms``) are added to the bag BCE.

Each epoch the :class:`monai.engines.SupervisedTrainer` (custom iteration
:func:`scripts.engines.mil.mil_train_iteration`: packed bags, one logit per bag, BCE-with-logits) runs over the training bags, then a :class:`monai.engines.SupervisedEvaluator`
with a :class:`monai.handlers.ROCAUC` metric scores the validation bags; the best epoch's weights are
kept (:class:`scripts.engines.handlers.BestEpochSelection`). The test fold is never looked at while training.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.handlers import TensorBoardHandler
from monai.utils import set_determinism
from torch import nn

from scripts.data.bags import Bag, feature_dim
from scripts.data.feature_norm import check_feature_norm, fit_feature_norm, standardize_bags
from scripts.engines.handlers import EpochHistory
from scripts.engines.mil import THRESHOLD_FALLBACK, THRESHOLD_KEYS, THRESHOLD_SOURCE, predict
from scripts.formats.checkpoints import copy_checkpoint, save_checkpoint
from scripts.formats.fingerprint import FINGERPRINT_METHOD, file_fingerprint
from scripts.formats.layout import OutputLayout
from scripts.metrics import classification_report, format_ci, nan_to_none, plot_roc, youden_threshold
from scripts.networks.methods import build_from_checkpoint, network_spec
from scripts.utils.distributed import is_main_process, unwrap
from scripts.utils.io_utils import write_csv, write_json

logger = logging.getLogger(__name__)

@dataclass
class TrainSettings:
    """``configs/train.json``'s training keys for Python callers (:func:`train_fold`, :func:`run_cross_validation`).

    Nothing here trains: :meth:`config_overrides` turns the fields into overrides of ``train.json``
    and the fold is trained by :func:`train_from_config`, like ``run training``. Each field is the
    config key of the same name unless noted.

    Attributes:
        epochs: maximum number of epochs.
        batch_size: bags per optimiser step (packed; BatchNorm sees their real instances).
        optimizer: ``factory(model) -> torch.optim.Optimizer``, replacing the config's ``optimizer``;
            None = the config's (Ranger with ``lr`` and ``weight_decay``).
        lr, weight_decay: the config's ``lr`` / ``weight_decay`` (used by its ``optimizer``).
        loss_function: bag loss on (logits, labels), replacing the config's ``loss``; None = ``BCEWithLogitsLoss``.
        monitor: ``"auc"`` (validation AUC, ties broken by lower validation loss) or ``"loss"``.
        patience: stop after this many validations without improvement of the monitored value (0 = never).
        val_interval: validate every this many epochs.
        seed: seeds weights, shuffling and dropout (the fold number is added in cross-validation).
        device: ``"cpu"``, ``"cuda"``, a torch.device, or ``"auto"`` (the config's: CUDA when available).
        num_workers: DataLoader workers reading bags (feature files are opened per bag).
        eval_batch_size: bags per prediction step of :func:`run_cross_validation` (default: ``batch_size``);
            not a config key.
        num_threads: torch CPU threads while training (None = torch's default). Tiny bags (MUSK,
            small demo bags) train faster on 1 thread, especially on a busy machine.
        distributed: under torchrun: DDP + DistributedSampler (``configs/multi_gpu_train.json``).
        feature_norm: ``"none"`` or ``"standardize"`` (:mod:`scripts.data.feature_norm`: per-dimension mean and
            standard deviation fitted on each fold's training bags only, stored in its checkpoint).
    """

    epochs: int = 100
    batch_size: int = 12
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    lr: float = 2e-4
    weight_decay: float = 1e-5
    loss_function: Callable | None = None
    monitor: str = "auc"
    patience: int = 20
    val_interval: int = 1
    seed: int = 0
    device: Any = "auto"
    num_workers: int = 0
    eval_batch_size: int | None = None
    num_threads: int | None = None
    distributed: bool = False
    feature_norm: str = "none"

    def config_overrides(self) -> dict:
        """The fields as ``configs/train.json`` overrides (what ``--epochs 50`` etc. would set)."""
        out = {key: getattr(self, key) for key in (
            "epochs", "batch_size", "lr", "weight_decay", "monitor", "patience", "val_interval", "seed",
            "num_workers", "num_threads", "distributed", "feature_norm")}  # fmt: skip
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer
        if self.loss_function is not None:
            out["loss"] = self.loss_function
        if self.device not in (None, "auto"):
            out["device"] = torch.device(self.device)
        return out

    def describe(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            if callable(value) and not isinstance(value, (int, float, str)):
                value = _describe_callable(value)
            elif isinstance(value, torch.device):
                value = str(value)
            out[key] = value
        return out


# ----------------------------------------------------------------------------------------------- network


def build_network(network_factory: Callable[..., nn.Module] | nn.Module, in_dim: int) -> nn.Module:
    """A fresh network: ``network_factory(in_dim=in_dim)``, or a deep copy of a module instance."""
    if isinstance(network_factory, nn.Module):
        return copy.deepcopy(network_factory)
    return network_factory(in_dim=in_dim)


def load_checkpoint(path: str | Path, device: Any = "cpu", trust: bool | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the network of a fold checkpoint (see :mod:`scripts.formats.checkpoints`)."""
    return build_from_checkpoint(path, device, trust)


# ----------------------------------------------------------------------------------------------- engines


def train_fold(
    network_factory: Callable[..., nn.Module] | nn.Module,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    settings: TrainSettings | None = None,
    desc: str = "train",
    parser=None,
    fold_dir: str | Path | None = None,
) -> tuple[nn.Module, dict]:
    """Python API: train one network from ``network_factory`` on ``train_bags``, selecting the epoch on ``val_bags``.

    A thin wrapper over :func:`train_from_config`: the config is ``parser`` (default: ``configs/train.json``,
    :func:`training_parser`) with ``settings``' :meth:`~TrainSettings.config_overrides` applied (when given;
    without ``parser`` the default :class:`TrainSettings`) and ``train#network`` built by
    ``network_factory``; the seed is ``settings.seed`` (else the config's), ``desc`` the run name,
    ``fold_dir`` receives what the config's handlers write (default: a temporary folder, removed afterwards).

    Returns ``(model, history)``: the model holds the selected epoch's weights, in eval mode, on the
    config's device; ``history`` is ``{"epochs": [per-epoch dicts: epoch, train_loss, val_loss,
    val_auc, lr, seconds], "best_epoch", "best_val_auc", "best_val_loss", "stopped_epoch", "seconds",
    "network": spec}``. ``val_bags`` may be empty (then the last epoch is kept, no early stopping).
    """
    if parser is None:
        parser = training_parser()
        settings = settings or TrainSettings()
    overrides = settings.config_overrides() if settings is not None else {}
    overrides.update({
        "network_factory": network_factory,
        "train#network": "$scripts.workflows.training.build_network(@network_factory, @feature_dim).to(@device)",
    })  # fmt: skip
    seed = settings.seed if settings is not None else int(parser.get_parsed_content("seed"))
    model, history = train_from_config(parser, train_bags, val_bags, fold_dir, seed, run_name=desc, overrides=overrides)
    history["network"] = network_spec(model, network_factory, feature_dim(train_bags))
    return model, history


class _quiet_ignite:
    """Ignite engines log every run start/finish at INFO; keep them at WARNING during training."""

    def __enter__(self):
        self.loggers = [logging.getLogger(n) for n in ("ignite.engine.engine.SupervisedTrainer", "ignite.engine.engine.SupervisedEvaluator")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


# ----------------------------------------------------------------------------------------------- cross-validation


@dataclass
class CVResult:
    """What :func:`run_cross_validation` returns: ``summary`` (as in ``summary.json``), out-of-fold
    ``predictions`` (one dict per test slide), the fold ``models``, their ``histories`` and their feature
    standardisers (``feature_norms``: one :class:`~scripts.data.feature_norm.FeatureStandardizer` or None per
    fold; a fold model takes its bags through it)."""

    summary: dict
    predictions: list[dict]
    models: list[nn.Module] = field(default_factory=list)
    histories: list[dict] = field(default_factory=list)
    feature_norms: list = field(default_factory=list)


def run_cross_validation(
    network_factory: Callable[..., nn.Module] | nn.Module,
    bags: Sequence[Bag],
    splits: dict,
    settings: TrainSettings | None = None,
    output_dir: str | Path | None = None,
    n_bootstrap: int = 2000,
    keep_models: bool = True,
    train_one: Callable[[int, list, list], tuple[nn.Module, dict]] | None = None,
    settings_description: dict | None = None,
) -> CVResult:
    """Train and test one network per fold of ``splits`` (see :mod:`scripts.data.splits`).

    ``train_one(k, train_bags, val_bags) -> (model, history)`` trains fold ``k``;
    :func:`config_cross_validation` (``run training``, the comparison, the ablation) passes one that
    calls :func:`train_from_config`. The default (Python API) is :func:`train_fold` with
    ``network_factory`` and ``settings`` (seed + k), which is the same config path.

    Per fold: with ``settings.feature_norm == "standardize"`` a standardiser fitted on the fold's train
    bags only (:mod:`scripts.data.feature_norm`) is applied to its train, val and test bags; then the network
    is trained on the train bags with the val bags for selection, a threshold chosen on the val
    bags (Youden), then the test bags are predicted. With ``output_dir``,
    ``<output_dir>/cv/`` receives ``fold<k>/model.pt`` (+ ``history.csv``, ``predictions.csv``),
    ``oof_predictions.csv``, ``summary.json``, ``roc.png`` and ``model.pt`` (the fold with the best
    validation AUC; fold ensembles are formed at evaluation).
    """
    settings = settings or TrainSettings()
    by_id = {b.bag_id: b for b in bags}
    cv_dir = OutputLayout(output_dir).cv_dir if output_dir is not None and is_main_process() else None  # rank 0 writes
    fold_rows, predictions, models, histories, norms = [], [], [], [], []
    feature_norm = check_feature_norm(getattr(settings, "feature_norm", "none"))
    total_start = time.perf_counter()
    for fold in splits["folds"]:
        k = int(fold["fold"])
        train = [by_id[s] for s in fold["train"] if s in by_id]
        val = [by_id[s] for s in fold.get("val", []) if s in by_id]
        test = [by_id[s] for s in fold["test"] if s in by_id]
        norm = fit_feature_norm(feature_norm, train)  # the fold's training bags only
        train, val, test = standardize_bags(norm, train, val, test)
        if train_one is None:
            fold_settings = copy.copy(settings)
            fold_settings.seed = settings.seed + k
            fold_dir = OutputLayout(output_dir).fold_dir(k) if output_dir is not None else None
            model, history = train_fold(network_factory, train, val, fold_settings, desc=f"fold{k}", fold_dir=fold_dir)
        else:
            model, history = train_one(k, train, val)
        val_probs = predict(model, val, settings.eval_batch_size or settings.batch_size) if val else np.zeros(0)
        val_labels = [b.label for b in val]
        threshold = youden_threshold(val_labels, val_probs) if val else 0.5
        one_class_val = bool(val) and len(set(val_labels)) < 2  # (no validation set at all is a deliberate choice)
        if one_class_val and is_main_process():
            logger.warning(
                "fold %d: the validation set (%d slides) has only label %s; fallback: checkpoint selection and early "
                "stopping on the validation loss, operating threshold 0.5 (no Youden threshold)", k, len(val), val_labels[0],
            )  # fmt: skip
        test_probs = predict(model, test, settings.eval_batch_size or settings.batch_size)
        test_labels = [b.label for b in test]
        report = classification_report(test_labels, test_probs, threshold, n_boot=n_bootstrap, seed=k,
                                       groups=[b.patient_id for b in test])
        fold_rows.append(
            {
                "fold": k,
                **report,
                "val_threshold": threshold,
                "best_epoch": history["best_epoch"],
                "stopped_epoch": history["stopped_epoch"],
                "val_auc": history["best_val_auc"],
                "val_loss": history["best_val_loss"],
                "n_train": len(train),
                "n_val": len(val),
                "val_one_class": one_class_val,
                "seconds": history["seconds"],
            }
        )
        rows = [
            {"slide_id": b.bag_id, "patient_id": b.patient_id, "center": b.center, "label": b.label,
             "prob": float(p), "fold": k, "threshold": threshold}
            for b, p in zip(test, test_probs)
        ]  # fmt: skip
        predictions.extend(rows)
        histories.append(history)
        if keep_models:
            models.append(model)
            norms.append(norm)
        if cv_dir is not None:
            fold_dir = cv_dir / f"fold{k}"
            save_checkpoint(
                fold_dir / "model.pt", model, metadata=fold_metadata(train, val, test), network=history["network"],
                fold=k, threshold=threshold, threshold_source=THRESHOLD_FALLBACK if one_class_val or not val else THRESHOLD_SOURCE,
                best_epoch=history["best_epoch"], val_auc=history["best_val_auc"],
                feature_dim=feature_dim(train),
                features=dict(getattr(bags, "feature_record", None) or {}, feature_dim=feature_dim(train)),
                feature_norm=norm.record() if norm is not None else {"kind": "none"},
            )  # fmt: skip  (features: encoder / feature_dim / target_mpp / patch_size, checked at inference)
            write_csv(fold_dir / "history.csv", history["epochs"])
            val_rows = [{"slide_id": b.bag_id, "label": b.label, "prob": float(p), "part": "val"} for b, p in zip(val, val_probs)]
            test_rows = [{"slide_id": r["slide_id"], "label": r["label"], "prob": r["prob"], "part": "test"} for r in rows]
            write_csv(fold_dir / "predictions.csv", val_rows + test_rows)
        if is_main_process():
            logger.info("fold %d: test AUC %.3f (val AUC %.3f, best epoch %d)", k, report["auc"], history["best_val_auc"], history["best_epoch"])

    labels = [r["label"] for r in predictions]
    probs = [r["prob"] for r in predictions]
    pooled = classification_report(labels, probs, [r["threshold"] for r in predictions], n_boot=n_bootstrap, seed=12345,
                                   groups=[r["patient_id"] for r in predictions])
    best_fold = max(fold_rows, key=lambda r: (_finite(r["val_auc"]), -_finite(r["val_loss"], math.inf)))["fold"]
    summary = {
        "network": histories[0]["network"] if histories else None,
        "settings": settings_description if settings_description is not None else settings.describe(),
        "n_slides": len(predictions),
        "n_patients": len({r["patient_id"] for r in predictions}),
        "skipped_slides": list(getattr(bags, "skipped", [])),
        "folds": fold_rows,
        "mean": _aggregate(fold_rows, np.nanmean),
        "std": _aggregate(fold_rows, lambda v: np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else math.nan),
        "pooled": pooled,
        "best_fold": best_fold,
        "n_folds_one_class_validation": sum(bool(r["val_one_class"]) for r in fold_rows),
        "feature_norm": feature_norm,
        "seconds": time.perf_counter() - total_start,
    }
    summary = nan_to_none(summary)
    if cv_dir is not None:
        write_csv(cv_dir / "oof_predictions.csv", predictions)
        write_json(cv_dir / "summary.json", summary)
        curves = {f"fold {r['fold']}": ([p["label"] for p in predictions if p["fold"] == r["fold"]],
                                        [p["prob"] for p in predictions if p["fold"] == r["fold"]]) for r in fold_rows}  # fmt: skip
        curves["pooled out-of-fold"] = (labels, probs)
        plot_roc(curves, cv_dir / "roc.png", title="Cross-validation ROC (test folds)")
        copy_checkpoint(cv_dir / f"fold{best_fold}" / "model.pt", cv_dir / "model.pt")
        logger.info(
            "cross-validation: mean AUC %.3f +- %.3f, pooled AUC %s (95%% CI: %s); results in %s",
            _finite(summary["mean"]["auc"]), _finite(summary["std"]["auc"]), format_ci(pooled["auc"], pooled["auc_ci"]),
            pooled["ci_method"], cv_dir,
        )  # fmt: skip
    return CVResult(summary, predictions, models, histories, norms)


def fold_metadata(train: Sequence[Bag], val: Sequence[Bag], test: Sequence[Bag]) -> dict:
    """Free-form ``metadata`` of a fold checkpoint: which slides trained, selected and tested it
    (with :func:`data_provenance`: the train/val slide and patient ids)."""
    return {
        "n_train": len(train), "n_val": len(val), "n_test": len(test), **data_provenance(train, val),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- config-driven folds


def active_config_parser():
    """The ``monai.bundle`` :class:`~monai.bundle.ConfigParser` evaluating the current config expression.

    MONAI gives a config expression no handle on its parser; the fold loop needs it to re-instantiate
    ``train#trainer``, ``validate#evaluator`` and their handlers for every fold. It is found on the call
    stack (``ConfigParser.get_parsed_content`` is always a caller of an expression being evaluated).
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    raise RuntimeError("no monai.bundle config is being evaluated: config_cross_validation, config_train_all, the "
                       "comparison, the ablation and the transfer take the training config from it; outside a config "
                       "pass parser= (e.g. scripts.workflows.training.training_parser())")


BUNDLE_ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = BUNDLE_ROOT / "configs" / "train.json"


def training_parser(overrides: dict | None = None, config_file: str | Path | Sequence[str | Path] | None = None):
    """``configs/train.json`` (or ``config_file``, a file or a list merged like ``--config_file "[...]"``)
    as a :class:`~monai.bundle.ConfigParser` with ``overrides`` set (config id -> value, as
    ``--epochs 50`` or ``--network_def#factor 0.3`` would set them; Python objects are allowed, e.g. an
    optimizer factory for ``optimizer``). For Python callers of :func:`train_from_config`, the
    comparison, the ablation and the transfer (``parser=``)."""
    files = [config_file] if isinstance(config_file, (str, Path)) else list(config_file or [TRAIN_CONFIG])
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    for key, value in (overrides or {}).items():
        if key not in parser:
            raise KeyError(f"{key!r} is not a key of {', '.join(str(f) for f in files)}; cannot override it")
        parser[key] = value
    return parser


def config_parser_for(parser, output_dir, stage: str):
    """The training config of a comparison / ablation / transfer run: ``parser`` or the one evaluating the
    current config expression (:func:`scripts.workflows.training.active_config_parser`). A first positional argument
    that is not a folder gets a clear error (these functions used to take a ``TrainSettings`` there)."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"{stage}: output_dir must be a folder, got {type(output_dir).__name__}; the training settings "
                        "come from the config (parser=scripts.workflows.training.training_parser({...}) from Python)")
    return parser if parser is not None else active_config_parser()


def train_from_config(
    parser, train_bags: Sequence[Bag], val_bags: Sequence[Bag], fold_dir: str | Path | None = None, seed: int = 0,
    run_name: str | None = None, bags: Sequence[Bag] | None = None, overrides: dict | None = None,
) -> tuple[nn.Module, dict]:
    """Train one network as ``train.json`` describes it, on ``train_bags``, validating on ``val_bags``.

    This is the project's one trainer. A fresh copy of ``parser``'s config (with every command-line
    override and ``--tracking`` patch) is parsed with ``overrides`` applied (config id -> value, e.g. a
    method's ``network_def#name`` and ``network_def#network_kwargs``), ``fold_dir``, ``seed`` and
    ``run_name`` set and the fold's bags in ``train_bags`` / ``val_bags`` (``bags``: the whole cohort);
    ``train#trainer`` and ``validate#evaluator`` with all their handlers are instantiated from it and
    run. Then the weights of the epoch chosen by ``validate#selection`` are restored.

    ``fold_dir`` receives what the handlers write (TensorBoard events, ``checkpoints/``); None = a
    temporary folder, removed when the fold is done (for runs that keep no fold outputs: the ablation,
    the transfer). Returns ``(model, history)``: the model in eval mode on the config's device; ``history``
    is ``{"epochs": [epoch, train_loss, val_loss, val_auc, lr, seconds per epoch], "best_epoch",
    "best_val_auc", "best_val_loss", "stopped_epoch", "seconds", "network": spec}``.
    """
    if not train_bags:
        raise ValueError("training needs at least one training bag")
    unlabeled = [b.bag_id for b in list(train_bags) + list(val_bags) if b.label is None]
    if unlabeled:
        raise ValueError(f"bags without a label cannot be used for training: {', '.join(unlabeled[:5])}")
    if fold_dir is None:
        with tempfile.TemporaryDirectory(prefix="smile_fold_") as scratch:
            return _train_from_config(parser, train_bags, val_bags, scratch, seed, run_name, bags, overrides)
    return _train_from_config(parser, train_bags, val_bags, fold_dir, seed, run_name, bags, overrides)


def _train_from_config(parser, train_bags, val_bags, fold_dir, seed, run_name, bags, overrides) -> tuple[nn.Module, dict]:
    fold = ConfigParser(copy.deepcopy(parser.get()), globals=dict(parser.globals))
    for key, value in (overrides or {}).items():
        fold[key] = value
    dim = feature_dim(train_bags)
    configured = fold.get("feature_dim")
    if configured in (None, ""):
        fold["feature_dim"] = dim
    elif int(configured) != dim:
        raise ValueError(f"the features are {dim}-d but feature_dim is {configured}; pass --feature_dim {dim} "
                         "(or leave it null to take it from the features)")
    fold["fold_dir"] = str(fold_dir)
    fold["seed"] = int(seed)
    fold["run_name"] = run_name
    num_threads = fold.get("num_threads")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    set_determinism(seed=int(seed))
    fold.parse(reset=True)
    fold.ref_resolver.resolved_content.update(
        {"train_bags": list(train_bags), "val_bags": list(val_bags), "bags": list(bags if bags is not None else train_bags)}
    )
    trainer = fold.get_parsed_content("train#trainer")
    evaluator = fold.get_parsed_content("validate#evaluator", default=None)
    train_handlers = list(fold.get_parsed_content("train#handlers", default=None) or [])
    val_handlers = list(fold.get_parsed_content("validate#handlers", default=None) or [])
    for handler in val_handlers:
        if hasattr(handler, "set_trainer") and getattr(handler, "_handler", True) is None:
            handler.set_trainer(trainer)  # EarlyStopHandler: the evaluator stops the trainer
    start = time.perf_counter()
    try:
        with _quiet_ignite():
            trainer.run()
    finally:
        for handler in train_handlers + val_handlers:
            if isinstance(handler, TensorBoardHandler):
                handler.close()  # flush the fold's event file (its folder may be a temporary one)
    model = unwrap(fold.get_parsed_content("train#network"))
    selection = fold.get_parsed_content("validate#selection", default=None)
    if selection is not None and len(val_bags):
        selection.restore()
    model.eval()
    recorder = next((h for h in train_handlers if isinstance(h, EpochHistory)), None)
    rows = list(getattr(recorder, "rows", []))
    best_epoch = int(getattr(selection, "best_epoch", 0) or (rows[-1]["epoch"] if rows else 0))
    best = next((row for row in rows if row["epoch"] == best_epoch), {})
    history = {
        "epochs": rows,
        "best_epoch": best_epoch,
        "best_val_auc": best.get("val_auc", math.nan),
        "best_val_loss": best.get("val_loss", math.nan),
        "stopped_epoch": int(trainer.state.epoch),
        "seconds": time.perf_counter() - start,
        "network": network_spec(model),
    }
    del evaluator
    return model, history


def training_description(parser, overrides: dict | None = None) -> dict:
    """The training recipe a config gives :func:`train_from_config` (``settings`` of ``summary.json``,
    ``comparison.json``, ``ablation.json``, ``transfer.json``); ``overrides`` as passed to it."""
    keys = ("epochs", "val_interval", "batch_size", "optimizer_name", "lr", "weight_decay", "patience", "monitor",
            "seed", "num_workers", "num_threads", "feature_dim", "distributed", "feature_norm")
    out = {k: _plain_setting(parser.get_parsed_content(k)) for k in keys if k in parser}
    for key, item in (("optimizer", "optimizer"), ("loss_function", "loss")):
        if item in parser:
            out[key] = _describe_callable(parser.get_parsed_content(item))
    network_def = {k: v for k, v in (parser.get("network_def") or {}).items() if not str(k).startswith("_")}
    for key, value in (overrides or {}).items():
        if key.startswith("network_def#"):
            network_def[key.split("#", 1)[1]] = value
    out["network_def"] = network_def
    out["device"] = str(parser.get_parsed_content("device"))
    return out


def _plain_setting(value):
    return value if value is None or isinstance(value, (bool, int, float, str, list, dict)) else str(value)


def config_cross_validation(
    bags: Sequence[Bag], splits: dict, output_dir: str | Path | None = None, n_bootstrap: int = 2000,
    batch_size: int | None = None, parser=None, overrides: dict | None = None, run_prefix: str = "",
    keep_models: bool = False,
) -> CVResult:
    """Cross-validation whose every fold is trained by ``train.json``'s trainer, evaluator and handlers.

    The loop only hands each fold (:func:`train_from_config`) its bags, folder (``<output_dir>/cv/fold<k>``:
    TensorBoard events, ``checkpoints/``; a temporary folder without ``output_dir``), seed (``seed + k``),
    MLflow run name (``<run_prefix>fold<k>``) and ``overrides`` (the comparison's method, the ablation's
    grid cell); a handler added or changed in the config therefore runs in every fold. The rest
    (threshold on the validation bags, test predictions, summary, OOF predictions, ROC plot, fold
    checkpoints) is :func:`run_cross_validation`; ``batch_size`` (default: the config's) is its
    prediction batch, ``keep_models`` keeps the fold models in the result.
    """
    parser = parser or active_config_parser()
    seed = int(parser.get_parsed_content("seed"))
    layout = OutputLayout(output_dir) if output_dir is not None else None

    def train_one(k: int, train: list, val: list):
        return train_from_config(parser, train, val, layout.fold_dir(k) if layout is not None else None, seed + k,
                                 run_name=f"{run_prefix}fold{k}", bags=bags, overrides=overrides)

    if batch_size is None:
        batch_size = parser.get_parsed_content("batch_size")
    settings = TrainSettings(batch_size=int(batch_size), seed=seed,
                             feature_norm=check_feature_norm(parser.get("feature_norm", "none")))
    return run_cross_validation(None, bags, splits, settings, output_dir=output_dir, n_bootstrap=n_bootstrap,
                                keep_models=keep_models, train_one=train_one,
                                settings_description=training_description(parser, overrides))


def config_train_all(bags: Sequence[Bag], output_dir: str | Path, parser=None) -> Path:
    """One network on every bag (no validation: the last epoch is kept), as ``train.json`` describes it;
    writes ``<output_dir>/final/model.pt`` (+ ``history.csv``, TensorBoard events)."""
    parser = parser or active_config_parser()
    final = Path(output_dir) / "final"
    norm = fit_feature_norm(parser.get("feature_norm", "none"), list(bags))
    (train,) = standardize_bags(norm, list(bags))
    model, history = train_from_config(parser, train, [], final, int(parser.get_parsed_content("seed")),
                                       run_name="final", bags=bags)
    if is_main_process():
        save_checkpoint(final / "model.pt", model, metadata={"n_train": len(bags), **data_provenance(list(bags), [])},
                        network=history["network"],
                        threshold=0.5, best_epoch=history["best_epoch"], feature_dim=feature_dim(bags),
                        feature_norm=norm.record() if norm is not None else {"kind": "none"})
        write_csv(final / "history.csv", history["epochs"])
    return final / "model.pt"


def data_provenance(train: Sequence[Bag], val: Sequence[Bag]) -> dict:
    """The slides and patients a fold model was trained and validated on (``scripts.data.heldout`` checks
    cohorts against them; ``scripts.workflows.evaluate`` refuses cohorts that share patients or slides).

    ``training_slides`` holds, per training and validation slide, its id, patient, part and the content
    fingerprints of its slide file and feature file (:func:`scripts.formats.fingerprint.file_fingerprint`;
    None for a bag without that file, e.g. features held in memory), so that a training slide listed
    again under a new slide and patient id, or copied under another name, is still recognised.
    """
    return {
        "train_slide_ids": [b.bag_id for b in train],
        "val_slide_ids": [b.bag_id for b in val],
        "train_patient_ids": sorted({str(b.patient_id) for b in train}),
        "val_patient_ids": sorted({str(b.patient_id) for b in val}),
        "fingerprint_method": FINGERPRINT_METHOD,
        "training_slides": [
            {"slide_id": b.bag_id, "patient_id": str(b.patient_id), "part": part,
             "slide_fingerprint": file_fingerprint(getattr(b, "slide_path", None)),
             "features_fingerprint": file_fingerprint(b.features_path)}
            for part, bags in (("train", train), ("val", val)) for b in bags
        ],  # fmt: skip
    }


def _finite(value, default: float = -1.0) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else default


def _aggregate(fold_rows: list[dict], reduce) -> dict:
    def values(get):
        return np.array([np.nan if get(r) is None else float(get(r)) for r in fold_rows], dtype=float)

    out = {"auc": float(reduce(values(lambda r: r["auc"])))}
    for at in ("at_0.5", "at_val_threshold"):
        out[at] = {key: float(reduce(values(lambda r: r[at][key]))) for key in THRESHOLD_KEYS}
    return out


def _describe_callable(value) -> Any:
    if isinstance(value, functools.partial):
        return {"callable": _describe_callable(value.func), **{k: v for k, v in value.keywords.items()}}
    if isinstance(value, nn.Module):
        return type(value).__name__
    return getattr(value, "__qualname__", type(value).__name__)


def write_history_csv(path: str | Path, history: dict) -> None:
    """Per-epoch history of :func:`train_from_config` / :func:`train_fold` as CSV."""
    write_csv(path, history["epochs"])


__all__ = [
    "TrainSettings", "CVResult", "train_fold", "run_cross_validation", "build_network", "load_checkpoint", "train_from_config",
    "config_cross_validation", "config_train_all", "active_config_parser", "training_parser", "training_description",
]  # fmt: skip
