"""Evaluation metrics: classification metrics with bootstrap intervals (``classification``) and paired
comparisons of two methods on the same slides (``paired``: patient-cluster paired bootstrap, the headline
test; DeLong, which assumes independent slides)."""

from scripts.metrics.classification import (
    auc,
    bootstrap_auc_ci,
    ci_method,
    classification_report,
    format_ci,
    nan_to_none,
    plot_roc,
    threshold_metrics,
    youden_threshold,
)

__all__ = [
    "auc",
    "bootstrap_auc_ci",
    "ci_method",
    "classification_report",
    "format_ci",
    "nan_to_none",
    "plot_roc",
    "threshold_metrics",
    "youden_threshold",
]
