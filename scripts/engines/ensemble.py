"""The fold ensemble: one component that loads a training run's fold models (or one model), gives the
operating threshold by one rule, and scores bags. Evaluation (:func:`scripts.workflows.evaluate.evaluate_cohort`)
and inference (:class:`scripts.workflows.predict.SlidePredictor`) both use it, so on the same checkpoints they
report the same threshold and the same probabilities.

The threshold rule (:data:`ENSEMBLE_THRESHOLD_RULE`): the mean of the fold models' operating thresholds,
each the Youden threshold on that fold's own validation slides (never on the scored cohort), applied to
the mean of the fold models' probabilities. Folds whose validation set was empty or one-class (their
threshold fell back to 0.5, ``threshold_source`` says so) are left out of the mean; when none is left the
threshold is 0.5. A threshold given by the user replaces the rule.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from scripts.data.feature_norm import FeatureStandardizer
from scripts.engines.mil import THRESHOLD_FALLBACK, predict
from scripts.formats.checkpoints import CheckpointError, load_into_network, resolve_checkpoints
from scripts.networks.methods import build_from_checkpoint

logger = logging.getLogger(__name__)

ENSEMBLE_THRESHOLD_RULE = (
    "mean of the fold models' operating thresholds, each the Youden threshold on that fold's validation slides "
    "only (never on the evaluated cohort), applied to the mean probability of the fold models; folds whose "
    "validation set was empty or one-class (threshold fell back to 0.5) are left out; 0.5 if none is left"
)


def ensemble_threshold(checkpoints: Sequence[tuple[str, dict]]) -> tuple[float, dict]:
    """The fold ensemble's operating threshold (:data:`ENSEMBLE_THRESHOLD_RULE`) and its record.

    ``checkpoints`` are (name, checkpoint dict) pairs. Warns naming the folds that fell back, and when the
    whole ensemble falls back to 0.5.
    """
    used, fallback = {}, []
    for name, checkpoint in checkpoints:
        value = checkpoint.get("threshold")
        source = str(checkpoint.get("threshold_source", ""))
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)) or source == THRESHOLD_FALLBACK:
            fallback.append(name)
        else:
            used[name] = float(value)
    if used:
        threshold = float(np.mean(list(used.values())))
        if fallback:
            logger.warning("ensemble threshold: fold model(s) %s had no usable validation threshold (empty or one-class "
                           "validation set); the threshold %.3f is the mean of the other %d", ", ".join(fallback), threshold,
                           len(used))  # fmt: skip
    else:
        threshold = 0.5
        logger.warning("ensemble threshold: no fold model has a validation threshold (%s); fallback 0.5",
                       ", ".join(fallback) or "no models")  # fmt: skip
    record = {"rule": ENSEMBLE_THRESHOLD_RULE, "threshold": threshold, "fold_thresholds": used, "fallback_folds": fallback,
              "fell_back_to_0.5": not used}  # fmt: skip
    return threshold, record


@torch.inference_mode()
def predict_bag(
    models: Sequence[nn.Module], features: torch.Tensor, device: torch.device | str = "cpu",
    inferer: Callable | None = None, feature_norms: Sequence[Callable | None] | None = None,
) -> tuple[float, np.ndarray, list[float]]:
    """Probability (mean over models of sigmoid(logit)), attention (N,) (mean over models; sums to 1),
    and each model's probability. ``features`` is (N, D); models take channel-first (1, D, N) bags and have
    ``forward_with_attention``. ``feature_norms``: per model, the transform its fold was trained with
    (:class:`scripts.data.feature_norm.FeatureStandardizer`) or None."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"a bag needs at least one patch feature (N, D); got shape {tuple(features.shape)}")
    raw = features.to(device, non_blocking=True)
    attention = torch.zeros(features.shape[0], dtype=torch.float64)
    probs = []
    for i, model in enumerate(models):
        norm = feature_norms[i] if feature_norms else None
        bag = (norm(raw) if norm is not None else raw).T.unsqueeze(0)  # (1, D, N), a view: no copy on CPU
        call = model.forward_with_attention
        logits, att = inferer(bag, call) if inferer is not None else call(bag)
        probs.append(float(torch.sigmoid(logits.float()).reshape(-1)[0]))
        attention += att.reshape(-1).double().cpu()
    attention /= len(models)
    return float(np.mean(probs)), attention.numpy(), probs


def model_name(path: Path) -> str:
    """``fold3`` for ``.../cv/fold3/model.pt``; the file stem for a lone checkpoint."""
    return path.parent.name if path.name == "model.pt" and path.parent.name.startswith("fold") else path.stem


class FoldEnsemble:
    """The models of ``checkpoints`` (a ``cv/`` folder of ``fold*/model.pt``, a training output folder, one
    checkpoint or a list: :func:`scripts.formats.checkpoints.resolve_checkpoints`).

    ``network_def``: the module each checkpoint's weights are loaded into (inference.json's ``network_def``,
    a bag classifier taking channel-first bags; required for bare state_dicts such as ``models/model.pt``);
    None rebuilds each fold's own MIL network from the architecture it records (evaluation).
    ``threshold``: a fixed operating threshold; None applies :data:`ENSEMBLE_THRESHOLD_RULE`.
    Loading is lazy (:meth:`load`, idempotent) so a config can build the component before any model exists.
    """

    def __init__(self, checkpoints, network_def: nn.Module | None = None, device: Any = "cpu",
                 threshold: float | None = None) -> None:
        self.checkpoints = checkpoints
        self.network_def = network_def
        self.device = torch.device(device)
        self.requested_threshold = None if threshold in (None, "") else float(threshold)
        self.paths: list[Path] = []
        self.names: list[str] = []
        self.models: list[nn.Module] = []
        self.extras: list[dict] = []
        self.threshold: float | None = self.requested_threshold
        self.threshold_record: dict = {}
        self.feature_norms: list = []  # per model: FeatureStandardizer or None (the checkpoint's feature_norm)

    def load(self) -> "FoldEnsemble":
        if self.models:
            return self
        paths = resolve_checkpoints(self.checkpoints)
        models, extras = [], []
        for path in paths:
            if self.network_def is None:
                model, extra = build_from_checkpoint(path, self.device)
            else:
                model, extra = load_into_network(path, self.network_def)
            models.append(model.to(self.device).eval())
            extras.append({k: v for k, v in extra.items() if k != "model"})
        self.paths, self.names, self.extras = list(paths), [model_name(p) for p in paths], extras
        try:
            self.feature_norms = [FeatureStandardizer.from_record(e.get("feature_norm")) for e in extras]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{', '.join(map(str, paths))}: unreadable feature_norm record: {error}") from None
        threshold, record = ensemble_threshold(list(zip(self.names, extras)))
        if self.requested_threshold is not None:
            threshold = self.requested_threshold
            record = dict(record, rule=f"given: {threshold} (replaces: {ENSEMBLE_THRESHOLD_RULE})", threshold=threshold)
        self.threshold, self.threshold_record = threshold, record
        self.models = models  # last: a half-loaded ensemble is never visible
        return self

    def __len__(self) -> int:
        return len(self.load().models)

    def named_checkpoints(self) -> list[tuple[str, dict]]:
        """(name, checkpoint record) of each model, for :func:`scripts.data.heldout.check_overlap`."""
        self.load()
        return list(zip(self.names, self.extras))

    def score_bag(self, features: torch.Tensor, inferer: Callable | None = None) -> tuple[float, np.ndarray, list[float]]:
        """One bag (N, D) through every model (:func:`predict_bag`)."""
        self.load()
        return predict_bag(self.models, features, self.device, inferer, self.feature_norms)

    def score_bags(self, bags: Sequence, batch_size: int = 12) -> tuple[np.ndarray, list[np.ndarray]]:
        """Many bags (:class:`scripts.data.bags.Bag`) through every model in packed batches: (mean probability
        per bag, each model's probabilities). For models rebuilt from their checkpoints (``network_def`` None)."""
        self.load()
        per_model = [predict(model, norm.apply(bags) if norm is not None else bags, batch_size=batch_size,
                             device=self.device) for model, norm in zip(self.models, self.feature_norms)]
        return np.mean(per_model, axis=0), per_model


__all__ = ["ENSEMBLE_THRESHOLD_RULE", "FoldEnsemble", "THRESHOLD_FALLBACK", "ensemble_threshold", "model_name", "predict_bag"]
