"""A simple, strong floor for any MIL result: mean + max pooled instance features, logistic regression.

Each bag becomes one vector, the concatenation of the mean and the maximum of its instances' features
(2 x D); scikit-learn's ``StandardScaler`` + ``LogisticRegression`` (L2, ``C``) is fitted on a fold's
training bags only. On the same folds as a MIL network it says how much the network adds over pooling:
on benchmarks the network was not tuned on, a MIL network within a point of this floor has learnt little
that pooling does not give (docs/benchmarks.md).

:func:`pooled_cross_validation` returns the same ``summary``/``predictions`` layout as
``scripts.workflows.training.run_cross_validation`` (threshold from each fold's validation bags, Youden; patient
bootstrap interval), so the comparison treats it as one more method (``FLOOR_NAME``).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scripts.data.bags import Bag
from scripts.metrics import classification_report, nan_to_none, youden_threshold

FLOOR_NAME = "pooled_logreg"
DESCRIPTION = "mean+max pooled instance features, StandardScaler + LogisticRegression (L2, C=1)"


def pooled_features(bags: Sequence[Bag]) -> np.ndarray:
    """(n_bags, 2 D) float64: per bag the mean and the maximum of its instances' features."""
    rows = []
    for bag in bags:
        x = bag.load()
        x = x.float().numpy() if hasattr(x, "numpy") else np.asarray(x, dtype=np.float32)
        rows.append(np.concatenate([x.mean(0), x.max(0)]).astype(np.float64))
    return np.stack(rows) if rows else np.zeros((0, 0))


def fit_pooled(train: Sequence[Bag], C: float = 1.0, seed: int = 0, features: np.ndarray | None = None):
    """The fitted scikit-learn pipeline (scaler + logistic regression) on ``train``'s pooled features."""
    labels = np.array([int(b.label) for b in train])
    if len(set(labels.tolist())) < 2:
        raise ValueError("the pooled logistic-regression floor needs both classes in the training bags")
    x = pooled_features(train) if features is None else features
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, random_state=seed))
    return model.fit(x, labels)


def predict_pooled(model, bags: Sequence[Bag]) -> np.ndarray:
    """Probabilities of the positive class for ``bags``."""
    if not bags:
        return np.zeros(0)
    return model.predict_proba(pooled_features(bags))[:, 1]


def pooled_cross_validation(bags: Sequence[Bag], splits: dict, n_bootstrap: int = 2000, C: float = 1.0) -> dict:
    """The floor on every fold of ``splits``: fit on train, threshold on val (Youden), score test.

    Returns ``{"summary", "predictions"}`` with the layout of :func:`scripts.workflows.training.run_cross_validation`.
    """
    by_id = {b.bag_id: b for b in bags}
    cache: dict[str, np.ndarray] = {}

    def feats(part):
        missing = [b for b in part if b.bag_id not in cache]
        if missing:
            cache.update(zip([b.bag_id for b in missing], pooled_features(missing)))
        return np.stack([cache[b.bag_id] for b in part])

    start = time.perf_counter()
    predictions, fold_rows = [], []
    for fold in splits["folds"]:
        k = int(fold["fold"])
        train = [by_id[s] for s in fold["train"] if s in by_id]
        val = [by_id[s] for s in fold.get("val", []) if s in by_id]
        test = [by_id[s] for s in fold["test"] if s in by_id]
        model = fit_pooled(train, C=C, features=feats(train))
        val_probs = model.predict_proba(feats(val))[:, 1] if val else np.zeros(0)
        threshold = youden_threshold([b.label for b in val], val_probs) if val else 0.5
        test_probs = model.predict_proba(feats(test))[:, 1]
        report = classification_report([b.label for b in test], test_probs, threshold, n_boot=n_bootstrap, seed=k,
                                       groups=[b.patient_id for b in test])  # fmt: skip
        fold_rows.append({"fold": k, **report, "val_threshold": threshold, "n_train": len(train), "n_val": len(val)})
        predictions.extend(
            {"slide_id": b.bag_id, "patient_id": b.patient_id, "center": b.center, "label": b.label, "prob": float(p),
             "fold": k, "threshold": threshold}
            for b, p in zip(test, test_probs)
        )  # fmt: skip
    labels = [r["label"] for r in predictions]
    probs = [r["prob"] for r in predictions]
    pooled = classification_report(labels, probs, [r["threshold"] for r in predictions], n_boot=n_bootstrap, seed=12345,
                                   groups=[r["patient_id"] for r in predictions])  # fmt: skip
    aucs = np.array([np.nan if r["auc"] is None else r["auc"] for r in fold_rows], dtype=float)
    summary = {
        "method": FLOOR_NAME,
        "description": DESCRIPTION,
        "n_slides": len(predictions),
        "n_patients": len({r["patient_id"] for r in predictions}),
        "folds": fold_rows,
        "mean": {"auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else math.nan},
        "std": {"auc": float(np.nanstd(aucs, ddof=1)) if np.isfinite(aucs).sum() > 1 else math.nan},
        "pooled": pooled,
        "seconds": time.perf_counter() - start,
    }
    return {"summary": nan_to_none(summary), "predictions": predictions}


__all__ = ["FLOOR_NAME", "DESCRIPTION", "pooled_features", "fit_pooled", "predict_pooled", "pooled_cross_validation"]
