"""Small ignite handlers for MIL training that MONAI does not have; ``configs/train.json`` lists them.

Everything else in the training pipeline is MONAI/ignite (``SupervisedTrainer``, ``SupervisedEvaluator``,
``ValidationHandler``, ``CheckpointSaver``, ``EarlyStopHandler``, ``StatsHandler``,
``TensorBoardStatsHandler``, ``MLFlowHandler``). These exist because of two things MONAI lacks:

* :class:`MeanBagLoss`: the epoch's training loss averaged over *bags* (a packed batch holds several bags
  of different sizes; a skipped one-instance batch reports NaN and is left out), as an ignite metric so
  that every stats/TensorBoard/MLflow handler logs it as ``train_epoch_loss`` (``train_loss`` is the
  per-iteration loss that MONAI's ``--tracking mlflow`` handler records);
* :class:`BestEpochSelection`: the SMILE selection rule, validation AUC with ties broken by the lower
  validation loss (``monitor="loss"``: the loss alone). It keeps the best epoch's weights in memory
  and publishes ``val_best_epoch`` in the evaluator's metrics, which rises exactly when a better epoch
  is found: MONAI's ``EarlyStopHandler`` and ``CheckpointSaver`` use it as their score, so they follow
  the same rule;
* :class:`EpochHistory`: one row per epoch (train loss, validation AUC/loss, learning rate, seconds),
  written to ``history.csv`` by the fold loop;
* :class:`BroadcastBuffers`: under DDP, rank 0's BatchNorm statistics go to every rank before validation.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from torch import nn

from scripts.utils.distributed import broadcast_buffers, unwrap


class MeanBagLoss(Metric):
    """Training loss per bag over an epoch (weighted by the bags of each packed batch; NaN batches skipped)."""

    required_output_keys = ("loss", "n_bags")

    def __init__(self, output_transform=lambda output: output[0] if isinstance(output, list) else output, **kwargs):
        super().__init__(output_transform=output_transform, **kwargs)

    def reset(self) -> None:
        self._sum, self._n = 0.0, 0

    def update(self, output) -> None:
        loss, n_bags = output
        value = float(loss)
        if math.isfinite(value):
            self._sum += value * int(n_bags)
            self._n += int(n_bags)

    def compute(self) -> float:
        return self._sum / self._n if self._n else math.nan


class BestEpochSelection:
    """Evaluator handler: keeps the weights of the best validation epoch (AUC, ties by lower loss).

    Args:
        network: the trained network (its ``state_dict`` is copied at each new best epoch).
        monitor: ``"auc"`` (``val_auc`` then ``-val_loss``) or ``"loss"`` (``-val_loss``).
        auc_key, loss_key: names of the metrics in ``engine.state.metrics``.
    """

    def __init__(self, network: nn.Module, monitor: str = "auc", auc_key: str = "val_auc", loss_key: str = "val_loss"):
        if monitor not in ("auc", "loss"):
            raise ValueError(f"monitor must be 'auc' or 'loss', got {monitor!r}")
        self.network, self.monitor, self.auc_key, self.loss_key = network, monitor, auc_key, loss_key
        self.best_key: tuple | None = None
        self.best_epoch = 0
        self.best_metrics: dict = {}
        self.best_state: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def key(self, metrics: dict) -> tuple:
        loss = float(metrics.get(self.loss_key, math.nan))
        loss_key = -loss if math.isfinite(loss) else -math.inf
        if self.monitor == "loss":
            return (loss_key,)
        auc = float(metrics.get(self.auc_key, math.nan))
        return (auc if math.isfinite(auc) else -1.0, loss_key)  # an undefined AUC ranks below any AUC

    def __call__(self, engine: Engine) -> None:
        key = self.key(engine.state.metrics)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_epoch = key, int(engine.state.epoch)
            self.best_metrics = {k: _number(v) for k, v in engine.state.metrics.items()}
            self.best_state = {k: v.detach().clone() for k, v in unwrap(self.network).state_dict().items()}
        engine.state.metrics["val_best_epoch"] = float(self.best_epoch)

    def score(self, engine: Engine) -> float:
        """Rises exactly when a better epoch was found (for ``EarlyStopHandler`` / ``CheckpointSaver``)."""
        return float(self.best_epoch)

    def restore(self) -> bool:
        """Load the best epoch's weights into the network; False when no validation ran."""
        if self.best_state is None:
            return False
        unwrap(self.network).load_state_dict(self.best_state)
        return True


class EpochHistory:
    """Trainer handler: one row per epoch (``epoch, train_loss, val_loss, val_auc, lr, seconds``).

    Attach it after the ``ValidationHandler`` (later in ``train#handlers``) so the epoch's validation
    metrics are there; epochs without validation get NaN.
    """

    def __init__(self, validator: Engine | None = None, loss_key: str = "train_epoch_loss"):
        self.validator, self.loss_key = validator, loss_key
        self.rows: list[dict] = []
        self._start = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        row = {"epoch": epoch, "train_loss": _number(engine.state.metrics.get(self.loss_key, math.nan))}
        val = self.validator
        validated = val is not None and getattr(val.state, "epoch", None) == epoch and val.state.metrics
        row["val_loss"] = _number(val.state.metrics.get("val_loss", math.nan)) if validated else math.nan
        row["val_auc"] = _number(val.state.metrics.get("val_auc", math.nan)) if validated else math.nan
        optimizer = getattr(engine, "optimizer", None)
        row["lr"] = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else math.nan
        row["seconds"] = time.perf_counter() - self._start
        self.rows.append(row)


class BroadcastBuffers:
    """Trainer handler (first in ``train#handlers``): under DDP, every rank gets rank 0's buffers at the end
    of each epoch, so all ranks validate the same network and stop at the same epoch. No-op otherwise."""

    def __init__(self, network: nn.Module):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: broadcast_buffers(self.network))


def _number(value: Any) -> float:
    if torch.is_tensor(value):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


__all__ = ["MeanBagLoss", "BestEpochSelection", "EpochHistory", "BroadcastBuffers"]
