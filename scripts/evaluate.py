"""Score a cohort with saved cross-validation fold models: the fold models' probabilities are averaged.

Outputs under ``<output_dir>/evaluation/``: ``predictions.csv`` (slide, label, ensemble probability and
each fold model's probability), ``summary.json`` (AUC with a 95% bootstrap interval, threshold metrics
at 0.5 and at the mean of the folds' validation thresholds, and the same per fold model) and ``roc.png``.
Slides without a label are predicted but left out of the metrics.

When slides have annotations (``annotations``: slide_id -> QuPath GeoJSON, from the datalist's
``annotations`` column), the fold models' mean attention is scored against them
(:func:`scripts.metrics.localisation.localise_cohort`): ``evaluation/localisation/<slide_id>.csv``,
``evaluation/localisation_slides.csv``, ``evaluation/localisation_summary.json``, and the summary's
``localisation`` entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scripts.io_utils import write_csv, write_json
from scripts.metrics import classification_report, nan_to_none, plot_roc
from scripts.mil_data import Bag, feature_dim
from scripts.training import load_checkpoint, predict

logger = logging.getLogger(__name__)


def find_fold_models(models_dir: str | Path) -> list[Path]:
    """``fold<k>/model.pt`` files under ``models_dir`` (a training run's ``cv/`` folder), in fold order."""
    models_dir = Path(models_dir)
    paths = sorted(models_dir.glob("fold*/model.pt"), key=lambda p: int(p.parent.name[4:]) if p.parent.name[4:].isdigit() else 0)
    if not paths:
        raise FileNotFoundError(
            f"no fold models (fold<k>/model.pt) under {models_dir}; pass --models_dir <training output_dir>/cv"
        )
    return paths


def evaluate_cohort(
    bags: Sequence[Bag],
    models_dir: str | Path,
    output_dir: str | Path,
    device: Any = "cpu",
    batch_size: int = 12,
    n_bootstrap: int = 2000,
    annotations: Mapping[str, str | Path] | None = None,
    top_k: int = 8,
) -> dict:
    """Predict ``bags`` with every fold model of ``models_dir``, average, compute metrics, write files."""
    out_dir = Path(output_dir) / "evaluation"
    paths = find_fold_models(models_dir)
    dim = feature_dim(bags)
    fold_probs, thresholds, names, models = [], [], [], []
    for path in paths:
        model, checkpoint = load_checkpoint(path, device)
        expected = checkpoint.get("feature_dim")
        if expected is not None and int(expected) != dim:
            raise ValueError(f"{path} was trained on {expected}-d features but this cohort has {dim}-d features; use the same encoder")
        fold_probs.append(predict(model, bags, batch_size=batch_size, device=device))
        thresholds.append(float(checkpoint.get("threshold", 0.5)))
        names.append(path.parent.name)
        models.append(model)
    probs = np.mean(fold_probs, axis=0)
    threshold = float(np.mean(thresholds))
    rows = []
    for i, bag in enumerate(bags):
        row = {"slide_id": bag.bag_id, "patient_id": bag.patient_id, "center": bag.center,
               "label": "" if bag.label is None else bag.label, "prob": float(probs[i])}  # fmt: skip
        row.update({f"prob_{name}": float(p[i]) for name, p in zip(names, fold_probs)})
        rows.append(row)
    labelled = [i for i, b in enumerate(bags) if b.label is not None]
    labels = [bags[i].label for i in labelled]
    summary: dict = {
        "models_dir": str(models_dir),
        "fold_models": [str(p) for p in paths],
        "n_slides": len(bags),
        "n_labelled": len(labelled),
        "skipped_slides": list(getattr(bags, "skipped", [])),
        "threshold": threshold,
    }
    curves = {}
    if labelled:
        summary["ensemble"] = classification_report(labels, probs[labelled], threshold, n_boot=n_bootstrap)
        summary["fold_models_metrics"] = {
            name: classification_report(labels, p[labelled], t, n_boot=n_bootstrap)
            for name, p, t in zip(names, fold_probs, thresholds)
        }
        curves = {name: (labels, p[labelled]) for name, p in zip(names, fold_probs)}
        curves["ensemble"] = (labels, probs[labelled])
        logger.info(
            "evaluation of %d slides with %d fold models: AUC %.3f (95%% CI %s)",
            len(labelled), len(paths), summary["ensemble"]["auc"], summary["ensemble"]["auc_ci"],
        )  # fmt: skip
    else:
        logger.warning("no slide has a label: predictions only, no metrics")
    annotated = [b for b in bags if (annotations or {}).get(b.bag_id)]
    if annotated:
        summary["localisation"] = localise_bags(annotated, models, annotations, out_dir, top_k, n_bootstrap)
    write_csv(out_dir / "predictions.csv", rows)
    write_json(out_dir / "summary.json", nan_to_none(summary))
    if curves:
        plot_roc(curves, out_dir / "roc.png", title="Evaluation ROC")
    return nan_to_none(summary)


def localise_bags(bags: Sequence[Bag], models: Sequence[Any], annotations: Mapping[str, str | Path], out_dir: str | Path,
                  top_k: int = 8, n_bootstrap: int = 2000) -> dict:
    """Localisation outputs of ``bags`` under ``out_dir``: the models' mean attention per bag against the
    bag's annotation file (patch corners and size from its feature file)."""
    from scripts.metrics.localisation import SlideAttention, bag_attention, localise_cohort, patch_geometry

    def slides():
        for bag in bags:
            if bag.features_path is None:
                logger.warning("localisation of %s: no feature file to read patch coordinates from", bag.bag_id)
                continue
            try:
                coords, size = patch_geometry(bag.features_path)
            except (OSError, ValueError) as error:
                logger.warning("localisation of %s: %s", bag.bag_id, error)
                continue
            features = bag.load()
            scores = [bag_attention(m, features) for m in models]
            scores = None if any(s is None for s in scores) else np.mean(scores, axis=0)
            yield SlideAttention(bag.bag_id, bag.patient_id, bag.label, coords, size, scores, Path(annotations[bag.bag_id]))

    return localise_cohort(slides(), out_dir, top_k=top_k, n_bootstrap=n_bootstrap)
