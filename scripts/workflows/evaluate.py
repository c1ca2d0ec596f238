"""Score a cohort with saved cross-validation fold models: the fold models' probabilities are averaged.

Outputs under ``<output_dir>/evaluation/``: ``predictions.csv`` (slide, label, ensemble probability and
each fold model's probability), ``summary.json`` (AUC with a 95% patient-level stratified bootstrap interval, threshold metrics
at 0.5 and at the ensemble threshold (``ENSEMBLE_THRESHOLD_RULE``: chosen on the folds' validation data only), and the same per fold model) and ``roc.png``.
Slides without a label are predicted but left out of the metrics.

The cohort must be held out: every fold checkpoint records the patients and slides it was trained and
validated on (slide ids and the content fingerprints of their slide and feature files), and a cohort
sharing a patient with any of them, or holding one of those slides under any slide or patient id, is
refused (:class:`OverlapError`, :mod:`scripts.data.heldout`; scoring those slides would be an in-sample
result, e.g. AUC 1.000 on pure-noise labels). ``allow_overlap=True``
(``--allow_overlap true``) scores it anyway and stamps ``"overlap"`` with ``"in_sample": true`` into
``summary.json``. There is no default cohort in ``configs/evaluate.json``: give ``--datalist``.
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

from scripts.data.bags import Bag, bags_from_datalist, feature_dim
from scripts.data.heldout import check_overlap
from scripts.engines.ensemble import FoldEnsemble
from scripts.formats.checkpoints import find_fold_checkpoints
from scripts.formats.layout import OutputLayout
from scripts.metrics import classification_report, format_ci, nan_to_none, plot_roc
from scripts.metrics.localisation import SlideAttention, bag_attention, localise_cohort, patch_geometry
from scripts.utils.errors import BundleError
from scripts.utils.io_utils import write_csv, write_json

logger = logging.getLogger(__name__)


class MissingCohortError(BundleError):
    """No cohort to evaluate was given."""


def evaluation_bags(datalist, features_dir=None, **kwargs):
    """Bags of the cohort to evaluate (``scripts.data.bags.bags_from_datalist``); refuses an empty datalist."""
    if datalist in (None, "") or str(datalist).strip() == "":
        raise MissingCohortError(
            "configs/evaluate.json: no cohort to evaluate; give a held-out datalist with --datalist other.csv "
            "(there is no default: the training cohort would be scored by models that saw it)"
        )
    return bags_from_datalist(datalist, features_dir, **kwargs)


def find_fold_models(models_dir: str | Path) -> list[Path]:
    """``fold<k>/model.pt`` files under ``models_dir`` (a training run's ``cv/`` folder), in fold order."""
    return find_fold_checkpoints(models_dir)


def evaluate_cohort(
    bags: Sequence[Bag],
    models_dir: str | Path,
    output_dir: str | Path,
    device: Any = "cpu",
    batch_size: int = 12,
    n_bootstrap: int = 2000,
    allow_overlap: bool = False,
    annotations: Mapping[str, str | Path] | None = None,
    top_k: int = 8,
) -> dict:
    """Predict ``bags`` with every fold model of ``models_dir``, average, compute metrics, write files.

    Refuses (:class:`OverlapError`) a cohort sharing patients or slides (by id or file content) with any
    fold model's training or validation data unless ``allow_overlap``.
    """
    out_dir = OutputLayout(output_dir).evaluation_dir
    ensemble = FoldEnsemble(find_fold_models(models_dir), device=device).load()
    paths, names, models = ensemble.paths, ensemble.names, ensemble.models
    dim = feature_dim(bags)
    overlap = check_overlap(bags, ensemble.named_checkpoints(), models_dir, allow_overlap=allow_overlap)
    threshold, threshold_record = ensemble.threshold, ensemble.threshold_record
    for path, checkpoint in zip(paths, ensemble.extras):
        expected = checkpoint.get("feature_dim")
        if expected is not None and int(expected) != dim:
            raise ValueError(f"{path} was trained on {expected}-d features but this cohort has {dim}-d features; use the same encoder")
    thresholds = [float(c.get("threshold", 0.5)) for c in ensemble.extras]
    probs, fold_probs = ensemble.score_bags(bags, batch_size=batch_size)
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
        "threshold_rule": threshold_record,
        "overlap": overlap,
    }
    curves = {}
    if labelled:
        patients = [bags[i].patient_id for i in labelled]
        summary["ensemble"] = classification_report(labels, probs[labelled], threshold, n_boot=n_bootstrap, groups=patients)
        summary["fold_models_metrics"] = {
            name: classification_report(labels, p[labelled], t, n_boot=n_bootstrap, groups=patients)
            for name, p, t in zip(names, fold_probs, thresholds)
        }
        curves = {name: (labels, p[labelled]) for name, p in zip(names, fold_probs)}
        curves["ensemble"] = (labels, probs[labelled])
        logger.info(
            "evaluation of %d slides with %d fold models: AUC %s (95%% CI: %s)",
            len(labelled), len(paths), format_ci(summary["ensemble"]["auc"], summary["ensemble"]["auc_ci"]),
            summary["ensemble"]["ci_method"],
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
