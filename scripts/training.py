"""Training MIL networks on packed bags with MONAI's ignite engines, one fold or a whole cross-validation.

Python API (the bundle's ``configs/train.json`` calls the same functions)::

    from scripts.networks import build_mil_network
    from scripts.mil_data import bags_from_datalist
    from scripts.splits import load_or_make_splits
    from scripts.training import TrainSettings, train_fold, run_cross_validation, predict

    factory = functools.partial(build_mil_network, "smile", factor=0.5)   # called as factory(in_dim=D)
    model, history = train_fold(factory, train_bags, val_bags, TrainSettings(epochs=50))
    probs = predict(model, test_bags)
    result = run_cross_validation(factory, bags, splits, TrainSettings(), output_dir="out")

* a *network factory* is any callable ``factory(in_dim=D) -> MILNetwork`` (a class, a
  ``functools.partial`` of :func:`scripts.networks.build_mil_network`, a config item with
  ``"_mode_": "callable"``) or an ``nn.Module`` instance (deep-copied for every fold);
* :class:`TrainSettings` holds everything else (epochs, batch size, optimiser factory, loss, early
  stopping, seed, device); its defaults are the SMILE recipe: Ranger 20.4.11 (:class:`scripts.optim.Ranger`) lr 2e-4,
  weight decay 1e-5, 100 epochs, batches of 12 bags, early stopping and checkpoint selection on the
  validation AUC (ties broken by the lower validation loss);
* a network's extra training losses (``training_loss_terms``) are added to the bag BCE.

Each epoch the :class:`monai.engines.SupervisedTrainer` (custom iteration: packed bags, one logit per
bag, BCE-with-logits) runs over the training bags, then a :class:`monai.engines.SupervisedEvaluator`
with a :class:`monai.handlers.ROCAUC` metric scores the validation bags; the best epoch's weights are
kept. The test fold is never looked at while training.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from scripts.formats.checkpoints import build_from_checkpoint, copy_checkpoint, network_spec, save_checkpoint
from scripts.formats.fingerprint import FINGERPRINT_METHOD, file_fingerprint
from scripts.formats.layout import OutputLayout
from scripts.io_utils import write_csv, write_json
from scripts.metrics import classification_report, format_ci, nan_to_none, plot_roc, youden_threshold
from scripts.distributed import broadcast_buffers, is_main_process, unwrap, wrap_ddp
from scripts.feature_norm import check_feature_norm, fit_feature_norm, standardize_bags
from scripts.mil_data import Bag, BagDataset, collate_bags, feature_dim

logger = logging.getLogger(__name__)

THRESHOLD_SOURCE = "youden on the fold's validation slides"
THRESHOLD_FALLBACK = "fallback 0.5 (validation set empty or one class)"
THRESHOLD_KEYS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")


def create_optimizer(
    params, name: str = "ranger", lr: float = 2e-4, weight_decay: float = 1e-5,
    betas=(0.95, 0.999), eps: float = 1e-5, **kwargs,
):  # fmt: skip
    """An optimiser by name for a model or parameters: ``ranger`` or any timm name.

    ``ranger`` (the default, the official SMILE optimiser) is :class:`scripts.optim.Ranger`: Ranger
    20.4.11 = RAdam (betas 0.95/0.999, eps 1e-5, rectified when the SMA length exceeds 5) + Lookahead
    (k 6, alpha 0.5) + gradient centralisation on tensors with more than one dimension + decoupled
    weight decay on every parameter. Every other name goes to timm's factory
    (``timm.optim.create_optimizer_v2``: ``lookahead_radam``, ``adam``, ``adamw``, ...); note that timm's
    ``lookahead_radam`` is *not* Ranger 20.4.11 (no gradient centralisation, coupled L2 decay, no
    decay on biases and normalisation parameters).

    Note: RAdam's rectification is an implicit warm-up of roughly 1/(1 - beta2) steps; on a small
    cohort (a few optimiser steps per epoch) it learns slowly in the first hundreds of steps.
    """
    if str(name).lower() == "ranger":
        from scripts.optim import Ranger

        if isinstance(params, nn.Module):
            params = params.parameters()
        return Ranger(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kwargs)
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(params, opt=name, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kwargs)


def ranger(params, lr: float = 2e-4, weight_decay: float = 1e-5, betas=(0.95, 0.999), eps: float = 1e-5):
    """Ranger 20.4.11 with the SMILE settings (:class:`scripts.optim.Ranger`); see :func:`create_optimizer`."""
    return create_optimizer(params, "ranger", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


@dataclass
class TrainSettings:
    """How one fold is trained.

    Attributes:
        epochs: maximum number of epochs.
        batch_size: bags per optimiser step (packed; BatchNorm sees their real instances).
        optimizer: ``factory(model) -> torch.optim.Optimizer``; None = :func:`ranger` with ``lr`` and
            ``weight_decay``.
        lr, weight_decay: used when ``optimizer`` is None.
        loss_function: bag loss on (logits, labels); None = ``BCEWithLogitsLoss``.
        monitor: ``"auc"`` (validation AUC, ties broken by lower validation loss) or ``"loss"``.
        patience: stop after this many epochs without improvement of the monitored value (0 = never).
        min_epochs: never stop before this epoch.
        seed: seeds weights, shuffling and dropout (the fold number is added in cross-validation).
        device: ``"cpu"``, ``"cuda"``, a torch.device, or ``"auto"``.
        num_workers: DataLoader workers reading bags (feature files are opened per bag).
        eval_batch_size: bags per validation/prediction step (default: ``batch_size``).
        progress: show a progress bar per fold.
        num_threads: torch CPU threads while training (None = torch's default). Tiny bags (MUSK,
            small demo bags) train faster on 1 thread, especially on a busy machine.
        feature_norm: ``"none"`` or ``"standardize"`` (:mod:`scripts.feature_norm`: per-dimension mean and
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
    min_epochs: int = 1
    seed: int = 0
    device: Any = "auto"
    num_workers: int = 0
    eval_batch_size: int | None = None
    progress: bool = True
    num_threads: int | None = None
    distributed: bool = False  # under torchrun: DDP + DistributedSampler (configs/multi_gpu_train.json)
    feature_norm: str = "none"

    def torch_device(self) -> torch.device:
        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer is None:
            return ranger(model, lr=self.lr, weight_decay=self.weight_decay)
        return self.optimizer(model)

    def make_loss(self) -> Callable:
        return nn.BCEWithLogitsLoss() if self.loss_function is None else self.loss_function

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


def _forward(model: nn.Module, x: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> dict:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # wraps scripts.distributed.PackedForward
        return model(x, bag_index, n_bags)
    if hasattr(model, "forward_packed"):
        return model.forward_packed(x, bag_index, n_bags)
    return {"logits": model(x, bag_index, n_bags)}


def _to_device(batch: dict, device: torch.device, non_blocking: bool):
    return (
        batch["features"].to(device, non_blocking=non_blocking),
        batch["bag_index"].to(device, non_blocking=non_blocking),
        int(batch["n_bags"]),
        batch["label"].to(device, non_blocking=non_blocking),
    )


def mil_train_iteration(engine, batch: dict) -> list[dict]:
    """One optimiser step on a packed batch: bag BCE plus the network's ``training_loss_terms``.

    The output is a one-item list (the packed batch is one item): MONAI handlers read it with
    ``from_engine(["loss"], first=True)``, as they read a decollated batch (e.g. the ``MLFlowHandler``
    that ``--tracking mlflow`` adds)."""
    model = engine.network
    if not model.training:
        model.train()
    x, bag_index, n_bags, labels = _to_device(batch, engine.state.device, engine.non_blocking)
    if x.shape[0] < 2:  # BatchNorm cannot train on a single instance; skip this (one-patch, one-bag) batch
        return [{"label": labels, "pred": torch.zeros_like(labels), "loss": torch.tensor(math.nan), "n_bags": n_bags}]
    engine.optimizer.zero_grad(set_to_none=True)
    out = _forward(model, x, bag_index, n_bags)
    loss = engine.loss_function(out["logits"], labels)
    inner = unwrap(model)
    extra = inner.training_loss_terms(out, x, bag_index, labels) if hasattr(inner, "training_loss_terms") else {}
    total = loss + sum(extra.values()) if extra else loss
    total.backward()
    engine.optimizer.step()
    return [{"label": labels, "pred": out["logits"].detach(), "loss": total.detach(), "n_bags": n_bags}]


def mil_eval_iteration(engine, batch: dict) -> dict:
    """Predict a packed batch in eval mode: ``pred`` probabilities, ``logits``, ``label``."""
    model = engine.network
    if model.training:
        model.eval()
    x, bag_index, n_bags, labels = _to_device(batch, engine.state.device, engine.non_blocking)
    with torch.no_grad():
        logits = _forward(model, x, bag_index, n_bags)["logits"].float()
    return {"pred": torch.sigmoid(logits), "logits": logits, "label": labels, "bag_id": batch["bag_id"]}


class _FoldMonitor:
    """Keeps the best weights by the monitored validation value, stops early, records the history."""

    def __init__(self, trainer, model: nn.Module, settings: TrainSettings, loss_function, has_val: bool, bar=None):
        self.trainer, self.model, self.settings, self.loss_function = trainer, model, settings, loss_function
        self.has_val, self.bar = has_val, bar
        self.history: list[dict] = []
        self.best_key: tuple | None = None
        self.best_state: dict | None = None
        self.best_epoch = 0
        self.stale = 0
        self._train_loss = self._train_n = 0.0
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._start = time.perf_counter()

    # trainer events
    def train_iteration(self, engine) -> None:
        out = engine.state.output[0]
        if not math.isnan(float(out["loss"])):
            self._train_loss += float(out["loss"]) * out["n_bags"]
            self._train_n += out["n_bags"]

    # evaluator events
    def val_started(self, engine) -> None:
        self._val_logits, self._val_labels = [], []

    def val_iteration(self, engine) -> None:
        self._val_logits.append(engine.state.output["logits"].cpu())
        self._val_labels.append(engine.state.output["label"].cpu())

    def epoch_completed(self, engine, evaluator=None) -> None:
        epoch = engine.state.epoch
        row = {"epoch": epoch, "train_loss": self._train_loss / max(self._train_n, 1)}
        self._train_loss = self._train_n = 0.0
        if self.has_val and self._val_logits:
            logits, labels = torch.cat(self._val_logits), torch.cat(self._val_labels)
            row["val_loss"] = float(nn.functional.binary_cross_entropy_with_logits(logits, labels))
            row["val_auc"] = float(evaluator.state.metrics.get("val_auc", math.nan)) if evaluator is not None else math.nan
            key = self._key(row["val_auc"], row["val_loss"])
        else:
            row["val_loss"] = row["val_auc"] = math.nan
            key = (epoch,)  # no validation: the last epoch wins
        row["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        row["seconds"] = time.perf_counter() - self._start
        self.history.append(row)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_epoch, self.stale = key, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.stale += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(
                f"loss {row['train_loss']:.3f} val_loss {row['val_loss']:.3f} val_auc {row['val_auc']:.3f} best@{self.best_epoch}"
            )
        patience = self.settings.patience
        if self.has_val and patience and self.stale >= patience and epoch >= self.settings.min_epochs:
            engine.terminate()

    def _key(self, val_auc: float, val_loss: float) -> tuple:
        loss_key = -val_loss if math.isfinite(val_loss) else -math.inf
        if self.settings.monitor == "loss":
            return (loss_key,)
        if self.settings.monitor != "auc":
            raise ValueError(f"monitor must be 'auc' or 'loss', got {self.settings.monitor!r}")
        # an undefined AUC (one-class validation set) ranks below any defined AUC; then the loss decides
        return (val_auc if math.isfinite(val_auc) else -1.0, loss_key)


def bag_loader(
    dataset, batch_size: int = 12, shuffle: bool = False, seed: int = 0, num_workers: int = 0, device: Any = "cpu",
    distributed: bool = False,
) -> DataLoader:
    """A DataLoader of packed bags (:func:`scripts.mil_data.collate_bags`) over a ``BagDataset`` or bags.

    With ``distributed`` and ``shuffle`` under torchrun, each rank trains on its share of the bags through a
    ``DistributedSampler`` (MONAI's trainer calls ``set_epoch`` every epoch); validation and prediction
    loaders stay whole, so every rank computes the same metrics.
    """
    if not isinstance(dataset, torch.utils.data.Dataset):
        dataset = BagDataset(dataset)
    generator = torch.Generator().manual_seed(int(seed))
    sampler = None
    if distributed and shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.utils.data.distributed import DistributedSampler

        sampler, shuffle = DistributedSampler(dataset, shuffle=True, seed=int(seed)), False
    return DataLoader(
        dataset, batch_size=int(batch_size), shuffle=shuffle, sampler=sampler, collate_fn=collate_bags,
        num_workers=int(num_workers), generator=generator, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=int(num_workers) > 0,
    )  # fmt: skip


def _loader(bags: Sequence[Bag], batch_size: int, shuffle: bool, settings: TrainSettings, seed: int) -> DataLoader:
    return bag_loader(BagDataset(bags), batch_size, shuffle, seed, settings.num_workers, settings.torch_device(),
                      settings.distributed)


def train_fold(
    network_factory: Callable[..., nn.Module] | nn.Module,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    settings: TrainSettings | None = None,
    desc: str = "train",
) -> tuple[nn.Module, dict]:
    """Train one network on ``train_bags``, selecting the epoch on ``val_bags``.

    Returns ``(model, history)``: the model holds the best epoch's weights, in eval mode, on the
    settings' device; ``history`` is ``{"epochs": [per-epoch dicts: epoch, train_loss, val_loss,
    val_auc, lr, seconds], "best_epoch", "best_val_auc", "best_val_loss", "stopped_epoch", "seconds",
    "network": spec}``. ``val_bags`` may be empty (then the last epoch is kept, no early stopping).
    """
    from ignite.engine import Events
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ROCAUC, ValidationHandler, from_engine
    from monai.utils import set_determinism

    settings = settings or TrainSettings()
    if not train_bags:
        raise ValueError("train_fold needs at least one training bag")
    unlabeled = [b.bag_id for b in list(train_bags) + list(val_bags) if b.label is None]
    if unlabeled:
        raise ValueError(f"bags without a label cannot be used for training: {', '.join(unlabeled[:5])}")
    device = settings.torch_device()
    if settings.num_threads:
        torch.set_num_threads(int(settings.num_threads))
    set_determinism(seed=settings.seed)
    in_dim = feature_dim(train_bags)
    model = build_network(network_factory, in_dim).to(device)
    engine_network = wrap_ddp(model, device) if settings.distributed else model  # same parameters
    optimizer = settings.make_optimizer(model)
    loss_function = settings.make_loss()
    train_loader = _loader(train_bags, settings.batch_size, True, settings, settings.seed)

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=settings.epochs,
        train_data_loader=train_loader,
        network=engine_network,
        optimizer=optimizer,
        loss_function=loss_function,
        iteration_update=mil_train_iteration,
        decollate=False,
        non_blocking=device.type == "cuda",
    )
    bar = None
    if settings.progress and is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.epochs, desc=desc, unit="epoch", leave=True, dynamic_ncols=True)
    has_val = len(val_bags) > 0
    monitor = _FoldMonitor(trainer, model, settings, loss_function, has_val, bar)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, monitor.train_iteration)
    if engine_network is not model:  # before validation: every rank gets rank 0's BatchNorm statistics
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: broadcast_buffers(model))
    evaluator = None
    if has_val:
        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=_loader(val_bags, settings.eval_batch_size or settings.batch_size, False, settings, 0),
            network=model,
            iteration_update=mil_eval_iteration,
            key_val_metric={"val_auc": ROCAUC(output_transform=from_engine(["pred", "label"]))},
            decollate=False,
            non_blocking=device.type == "cuda",
        )
        evaluator.add_event_handler(Events.EPOCH_STARTED, monitor.val_started)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, monitor.val_iteration)
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    # registered after the ValidationHandler: runs once the epoch's validation is done
    trainer.add_event_handler(Events.EPOCH_COMPLETED, monitor.epoch_completed, evaluator)
    start = time.perf_counter()
    with _quiet_ignite():
        trainer.run()
    if bar is not None:
        bar.close()
    if monitor.best_state is not None:
        model.load_state_dict(monitor.best_state)
    model.eval()
    best = next((row for row in monitor.history if row["epoch"] == monitor.best_epoch), {})
    history = {
        "epochs": monitor.history,
        "best_epoch": monitor.best_epoch,
        "best_val_auc": best.get("val_auc", math.nan),
        "best_val_loss": best.get("val_loss", math.nan),
        "stopped_epoch": monitor.history[-1]["epoch"] if monitor.history else 0,
        "seconds": time.perf_counter() - start,
        "network": network_spec(model, network_factory, in_dim),
    }
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


def predict(model: nn.Module, bags: Sequence[Bag], batch_size: int = 12, device: Any = None, num_workers: int = 0) -> np.ndarray:
    """Probabilities (sigmoid of the bag logit) of ``bags``, in order, in eval mode."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(BagDataset(bags), batch_size=batch_size, shuffle=False, collate_fn=collate_bags, num_workers=num_workers)
    out = []
    with torch.no_grad():
        for batch in loader:
            x, bag_index, n_bags, _ = _to_device(batch, device, False)
            out.append(torch.sigmoid(_forward(model, x, bag_index, n_bags)["logits"].float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


# ----------------------------------------------------------------------------------------------- cross-validation


@dataclass
class CVResult:
    """What :func:`run_cross_validation` returns: ``summary`` (as in ``summary.json``), out-of-fold
    ``predictions`` (one dict per test slide), the fold ``models``, their ``histories`` and their feature
    standardisers (``feature_norms``: one :class:`~scripts.feature_norm.FeatureStandardizer` or None per
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
    """Train and test one network per fold of ``splits`` (see :mod:`scripts.splits`).

    ``train_one(k, train_bags, val_bags) -> (model, history)`` trains fold ``k``; the default is
    :func:`train_fold` with ``network_factory`` and ``settings`` (seed + k). ``configs/train.json`` passes
    :func:`train_from_config` instead (see :func:`config_cross_validation`).

    Per fold: with ``settings.feature_norm == "standardize"`` a standardiser fitted on the fold's train
    bags only (:mod:`scripts.feature_norm`) is applied to its train, val and test bags; then
    :func:`train_fold` on the train bags with the val bags for selection, a threshold chosen on the val
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
            model, history = train_fold(network_factory, train, val, fold_settings, desc=f"fold {k}")
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
    import inspect

    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    raise RuntimeError("config_cross_validation/config_train_all must be called from a monai.bundle config "
                       "(python -m monai.bundle run training --config_file configs/train.json); pass parser=")


def train_from_config(
    parser, train_bags: Sequence[Bag], val_bags: Sequence[Bag], fold_dir: str | Path, seed: int,
    run_name: str | None = None, bags: Sequence[Bag] | None = None,
) -> tuple[nn.Module, dict]:
    """Train one network as ``train.json`` describes it, on ``train_bags``, validating on ``val_bags``.

    A fresh copy of ``parser``'s config (with every command-line override and ``--tracking`` patch) is
    parsed with ``fold_dir``, ``seed`` and ``run_name`` set and the fold's bags in ``train_bags`` /
    ``val_bags``; ``train#trainer`` and ``validate#evaluator`` with all their handlers are instantiated
    from it and run. Then the weights of the epoch chosen by ``validate#selection`` are restored.
    Returns ``(model, history)`` like :func:`train_fold`.
    """
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    if not train_bags:
        raise ValueError("training needs at least one training bag")
    unlabeled = [b.bag_id for b in list(train_bags) + list(val_bags) if b.label is None]
    if unlabeled:
        raise ValueError(f"bags without a label cannot be used for training: {', '.join(unlabeled[:5])}")
    fold = ConfigParser(copy.deepcopy(parser.get()), globals=dict(parser.globals))
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
    for handler in list(fold.get_parsed_content("validate#handlers", default=None) or []):
        if hasattr(handler, "set_trainer") and getattr(handler, "_handler", True) is None:
            handler.set_trainer(trainer)  # EarlyStopHandler: the evaluator stops the trainer
    start = time.perf_counter()
    with _quiet_ignite():
        trainer.run()
    model = unwrap(fold.get_parsed_content("train#network"))
    selection = fold.get_parsed_content("validate#selection", default=None)
    if selection is not None and len(val_bags):
        selection.restore()
    model.eval()
    from scripts.handlers import EpochHistory

    recorder = next((h for h in fold.get_parsed_content("train#handlers") if isinstance(h, EpochHistory)), None)
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


def _hyperparameters(parser) -> dict:
    keys = ("epochs", "val_interval", "batch_size", "optimizer_name", "lr", "weight_decay", "patience", "monitor",
            "seed", "num_workers", "num_threads", "feature_dim", "distributed", "feature_norm")
    out = {k: parser.get(k) for k in keys if k in parser}
    out["network_def"] = {k: v for k, v in (parser.get("network_def") or {}).items() if not str(k).startswith("_")}
    out["device"] = str(parser.get_parsed_content("device"))
    return out


def config_cross_validation(
    bags: Sequence[Bag], splits: dict, output_dir: str | Path | None = None, n_bootstrap: int = 2000,
    batch_size: int = 12, parser=None,
) -> CVResult:
    """Cross-validation whose every fold is trained by ``train.json``'s trainer, evaluator and handlers.

    The loop only hands each fold its bags, folder (``<output_dir>/cv/fold<k>``: TensorBoard events,
    ``checkpoints/``), seed (``seed + k``) and MLflow run name (``fold<k>``); a handler added or changed in
    the config therefore runs in every fold. The rest (threshold on the validation bags, test predictions,
    summary, OOF predictions, ROC plot, fold checkpoints) is :func:`run_cross_validation`.
    """
    parser = parser or active_config_parser()
    seed = int(parser.get_parsed_content("seed"))
    layout = OutputLayout(output_dir if output_dir is not None else ".")

    def train_one(k: int, train: list, val: list):
        return train_from_config(parser, train, val, layout.fold_dir(k), seed + k, run_name=f"fold{k}", bags=bags)

    settings = TrainSettings(batch_size=int(batch_size), seed=seed,
                             feature_norm=check_feature_norm(parser.get("feature_norm", "none")))
    return run_cross_validation(None, bags, splits, settings, output_dir=output_dir, n_bootstrap=n_bootstrap,
                                keep_models=False, train_one=train_one, settings_description=_hyperparameters(parser))


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
    """The slides and patients a fold model was trained and validated on (``scripts.heldout`` checks
    cohorts against them; ``scripts.evaluate`` refuses cohorts that share patients or slides).

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
    """Per-epoch history of :func:`train_fold` as CSV."""
    write_csv(path, history["epochs"])


__all__ = [
    "TrainSettings", "CVResult", "train_fold", "predict", "run_cross_validation", "ranger", "create_optimizer",
    "build_network", "network_spec", "save_checkpoint", "load_checkpoint", "bag_loader", "train_from_config",
    "config_cross_validation", "config_train_all", "active_config_parser",
]  # fmt: skip
