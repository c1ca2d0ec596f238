"""Binary classification metrics for slide-level predictions: AUC with a patient-level (cluster)
bootstrap interval stratified by label, and the threshold metrics (accuracy, balanced accuracy, F1, sensitivity, specificity)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from scripts.utils.io_utils import atomic_path


def auc(labels: Sequence[int], probs: Sequence[float]) -> float:
    """ROC-AUC, NaN when only one class is present."""
    labels = np.asarray(labels, dtype=int)
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, np.asarray(probs, dtype=float)))


def bootstrap_auc_ci(
    labels: Sequence[int], probs: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
    groups: Sequence | None = None, stratified: bool = True,
) -> list[float]:  # fmt: skip
    """Percentile bootstrap interval of the AUC, resampling patients (clusters) stratified by label.

    ``groups`` holds one patient id per slide: patients are resampled with replacement and carry all
    their slides, so slides of one patient (correlated) are never treated as independent. Without
    ``groups`` every slide is its own cluster. ``stratified``: positive patients (at least one positive
    slide) and negative patients are resampled separately, each stratum keeping its size, so every
    resample has both classes. Unstratified resamples with one class are redrawn whole (at most
    ``20 * n_boot`` draws, then ``[nan, nan]``). ``[nan, nan]`` when the AUC is undefined.
    :func:`ci_method` names the method for the output next to the interval.
    """
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    n = len(labels)
    if len(np.unique(labels)) < 2 or n_boot <= 0:
        return [math.nan, math.nan]
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"bootstrap_auc_ci: {len(groups)} patient ids for {n} slides; give one per slide")
        _, inverse = np.unique(groups.astype(str), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    cluster_positive = np.array([labels[m].max() == 1 for m in members])
    strata = [np.flatnonzero(cluster_positive), np.flatnonzero(~cluster_positive)] if stratified else [np.arange(len(members))]
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    done = attempts = 0
    while done < n_boot:
        attempts += 1
        if attempts > 20 * n_boot:
            return [math.nan, math.nan]
        chosen = np.concatenate([stratum[rng.integers(0, len(stratum), len(stratum))] for stratum in strata])
        idx = np.concatenate([members[c] for c in chosen])
        y = labels[idx]
        if y.min() == y.max():  # only possible unstratified: draw the whole resample again
            continue
        values[done] = _fast_auc(y, probs[idx])
        done += 1
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def ci_method(n_boot: int, groups: Sequence | None = None, stratified: bool = True, alpha: float = 0.05) -> str:
    """How :func:`bootstrap_auc_ci` made an interval, for the output next to it."""
    unit = "patient" if groups is not None else "slide"
    return f"{unit} bootstrap ({'stratified' if stratified else 'unstratified'}, {int(n_boot)}), percentile {100 * (1 - alpha):g}%"


def format_ci(value: float | None, ci: Sequence | None, digits: int = 3) -> str:
    """``0.812 [0.701, 0.905]`` (three decimals; ``n/a`` for undefined values)."""

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{digits}f}"

    ci = list(ci) if ci is not None else [None, None]
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _fast_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (equals sklearn's roc_auc_score)."""
    ranks = rankdata(probs)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def youden_threshold(labels: Sequence[int], probs: Sequence[float], default: float = 0.5) -> float:
    """Threshold maximising sensitivity + specificity - 1 (``default`` when undefined)."""
    labels = np.asarray(labels, dtype=int)
    if len(np.unique(labels)) < 2:
        return default
    fpr, tpr, thresholds = roc_curve(labels, np.asarray(probs, dtype=float))
    best = int(np.argmax(tpr - fpr))
    value = float(thresholds[best])
    return min(max(value, 0.0), 1.0)  # roc_curve's first threshold is +inf


def threshold_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float | Sequence[float] = 0.5) -> dict:
    """Accuracy, balanced accuracy, F1, sensitivity, specificity of ``probs >= threshold``
    (``threshold`` may be one value per case, e.g. each fold's own)."""
    labels = np.asarray(labels, dtype=int)
    predicted = (np.asarray(probs, dtype=float) >= np.asarray(threshold, dtype=float)).astype(int)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    precision = tp / (tp + fp) if tp + fp else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else math.nan
    balanced = np.nanmean([sensitivity, specificity]) if not (math.isnan(sensitivity) and math.isnan(specificity)) else math.nan
    return {
        "accuracy": (tp + tn) / len(labels) if len(labels) else math.nan,
        "balanced_accuracy": float(balanced),
        "f1": f1,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
    }  # fmt: skip


def classification_report(
    labels: Sequence[int], probs: Sequence[float], val_threshold: float | Sequence[float] | None = None,
    n_boot: int = 2000, seed: int = 0, groups: Sequence | None = None,
) -> dict:  # fmt: skip
    """AUC, its 95% bootstrap interval (patients resampled when ``groups``, the patient id per slide, is
    given; stratified by label; ``ci_method`` says which), and threshold metrics at 0.5 and at the
    validation threshold."""
    report = {
        "n": int(len(labels)),
        "n_positive": int(np.sum(np.asarray(labels, dtype=int))),
        "auc": auc(labels, probs),
        "auc_ci": bootstrap_auc_ci(labels, probs, n_boot=n_boot, seed=seed, groups=groups),
        "ci_method": ci_method(n_boot, groups),
        "at_0.5": threshold_metrics(labels, probs, 0.5),
    }
    if val_threshold is not None:
        report["at_val_threshold"] = threshold_metrics(labels, probs, val_threshold)
    return report


def nan_to_none(obj):
    """Replace NaN floats by None recursively (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


def plot_roc(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path, title: str = "ROC") -> None:
    """ROC curves (name -> (labels, probs)) in one PNG, written atomically."""
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    for name, (labels, probs) in curves.items():
        labels = np.asarray(labels, dtype=int)
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, np.asarray(probs, dtype=float))
        bold = name.startswith("pooled") or name.startswith("ensemble")
        ax.plot(fpr, tpr, lw=2.5 if bold else 1, alpha=1 if bold else 0.6, label=f"{name} (AUC {auc(labels, probs):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
