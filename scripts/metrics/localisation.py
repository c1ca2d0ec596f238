"""Does the attention point at what a pathologist annotated? Localisation metrics against region
annotations (QuPath GeoJSON, :mod:`scripts.formats.annotations`).

Per slide (patches with level-0 corners ``coords`` and side ``patch_size_level0``, attention ``scores``):

* ``overlap``: fraction of each patch's area covered by the union of the annotations (exact polygon
  intersection areas, holes and multipolygons included, with shapely);
* a patch *touches* an annotation when its overlap is above ``min_overlap`` (default 0: any positive area);
* ``attention_auc``: ROC-AUC of the attention for "patch touches an annotation" (undefined when every
  patch or no patch touches one);
* ``top_k_hit``: 1 when at least one of the ``k`` most attended patches touches an annotation, else 0;
* ``attention_mass``: the share of the slide's total attention that falls on touching patches.

Over a cohort the means are taken over *annotated positive* slides (label 1 with an annotation file);
their 95% intervals resample patients (all slides of a drawn patient go in together), since slides of
one patient are not independent. Slides without attention (mean or max pooling) get no figures.

Outputs (:func:`localise_cohort`): ``<dir>/localisation/<slide_id>.csv`` (one row per patch: x, y,
overlap, touches, attention), ``<dir>/localisation_slides.csv`` (one row per slide) and
``<dir>/localisation_summary.json`` (keys ``attention_auc``, ``top_k_hit_rate``,
``attention_mass_on_annotations`` with ``*_ci`` intervals, ``n_slides``, ``n_patients``, ``top_k``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import shapely
import torch

from scripts.formats.annotations import annotation_union, read_annotations
from scripts.formats.attention_outputs import percentile_rank, top_k_indices
from scripts.formats.feature_file import patch_geometry as file_geometry
from scripts.formats.feature_file import read_features
from scripts.formats.layout import OutputLayout
from scripts.metrics.classification import auc, nan_to_none
from scripts.utils.io_utils import write_csv, write_json

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("attention_auc", "top_k_hit_rate", "attention_mass_on_annotations")
_SLIDE_KEYS = {"attention_auc": "attention_auc", "top_k_hit_rate": "top_k_hit", "attention_mass_on_annotations": "attention_mass"}


# ----------------------------------------------------------------------------------------------- per patch
def patch_overlap(coords, patch_size_level0: float, annotations) -> np.ndarray:
    """Fraction (0-1) of each square patch covered by the union of ``annotations``.

    Args:
        coords: (N, 2) level-0 top-left corners (x, y).
        patch_size_level0: patch side in level-0 pixels.
        annotations: a list of :class:`~scripts.formats.annotations.Annotation` or one shapely geometry.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    side = float(patch_size_level0)
    if not side > 0:
        raise ValueError(f"patch_size_level0 must be positive; got {patch_size_level0}")
    region = annotations if hasattr(annotations, "geom_type") else annotation_union(annotations)
    overlap = np.zeros(len(coords))
    if len(coords) == 0 or region.is_empty:
        return overlap
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + side, coords[:, 1] + side)
    shapely.prepare(region)
    hit = np.flatnonzero(shapely.intersects(region, boxes))
    if len(hit):
        overlap[hit] = shapely.area(shapely.intersection(boxes[hit], region)) / (side * side)
    return np.clip(overlap, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- per slide
def slide_localisation(scores, overlap, top_k: int = 8, min_overlap: float = 0.0) -> dict:
    """Attention AUC, top-k hit and attention mass of one slide (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    overlap = np.asarray(overlap, dtype=np.float64).reshape(-1)
    if scores.shape != overlap.shape:
        raise ValueError(f"{scores.shape[0]} attention scores but {overlap.shape[0]} patch overlaps")
    touches = overlap > float(min_overlap)
    total = scores.sum()
    top = top_k_indices(scores, top_k)
    return {
        "n_patches": int(len(scores)),
        "n_annotated_patches": int(touches.sum()),
        "annotated_fraction": float(touches.mean()) if len(scores) else math.nan,
        "attention_auc": auc(touches.astype(int), scores) if len(scores) else math.nan,
        "top_k_hit": float(bool(touches[top].any())) if len(top) else math.nan,
        "attention_mass": float(scores[touches].sum() / total) if total > 0 else math.nan,
    }


# ----------------------------------------------------------------------------------------------- cohort
def patient_bootstrap_mean_ci(values, patients, n_bootstrap: int = 2000, alpha: float = 0.05, seed: int = 0) -> list[float]:
    """Percentile interval of the mean of ``values`` (NaN ignored) resampling patients with replacement."""
    values = np.asarray(values, dtype=np.float64)
    patients = np.asarray(patients).astype(str)
    keep = np.isfinite(values)
    values, patients = values[keep], patients[keep]
    if len(values) == 0 or n_bootstrap <= 0:
        return [math.nan, math.nan]
    ids, inverse = np.unique(patients, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_bootstrap, len(ids)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def summarise(rows: Sequence[dict], top_k: int = 8, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Cohort summary over annotated positive slides (rows as in ``localisation_slides.csv``)."""
    used = [r for r in rows if r.get("status") == "ok" and r.get("label") in (1, "1") and r.get("annotated")]
    patients = [str(r.get("patient_id", r["slide_id"])) for r in used]
    summary: dict = {"n_slides": len(used), "n_patients": len(set(patients)), "top_k": int(top_k)}
    for key, slide_key in _SLIDE_KEYS.items():
        values = np.array([r[slide_key] for r in used], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[key] = float(finite.mean()) if len(finite) else math.nan
        summary[f"{key}_ci"] = patient_bootstrap_mean_ci(values, patients, n_bootstrap, seed=seed)
        summary[f"{key}_n_slides"] = int(len(finite))
    summary["slides"] = [r["slide_id"] for r in used]
    return summary


@dataclass
class SlideAttention:
    """What :func:`localise_cohort` needs per slide. ``annotations`` is the GeoJSON path (None = not
    annotated); ``scores`` None = the method has no attention."""

    slide_id: str
    patient_id: str
    label: int | None
    coords: np.ndarray
    patch_size_level0: float
    scores: np.ndarray | None
    annotations: Path | None


def localise_cohort(
    slides: Iterable[SlideAttention],
    output_dir: str | Path,
    top_k: int = 8,
    min_overlap: float = 0.0,
    n_bootstrap: int = 2000,
    write_patches: bool = True,
) -> dict:
    """Per-slide and summary localisation outputs under ``output_dir`` (module docstring); returns the
    summary. A slide whose annotation file cannot be read gets ``status`` failed and the others go on."""
    output_dir = Path(output_dir)
    rows = []
    for slide in slides:
        row = {"slide_id": slide.slide_id, "patient_id": slide.patient_id,
               "label": "" if slide.label is None else int(slide.label),
               "annotated": slide.annotations is not None, "status": "ok", "error": ""}
        if slide.annotations is None:
            continue
        try:
            if slide.scores is None:
                raise ValueError("the method has no attention")
            annotations = read_annotations(slide.annotations)
            overlap = patch_overlap(slide.coords, slide.patch_size_level0, annotations)
            scores = np.asarray(slide.scores, dtype=np.float64).reshape(-1)
            row.update(slide_localisation(scores, overlap, top_k, min_overlap))
            row["n_annotations"] = len(annotations)
            if write_patches:
                coords = np.asarray(slide.coords).reshape(-1, 2)
                write_csv(output_dir / "localisation" / f"{slide.slide_id}.csv", [
                    {"x": int(coords[i, 0]), "y": int(coords[i, 1]), "overlap": round(float(overlap[i]), 6),
                     "touches_annotation": int(overlap[i] > min_overlap), "attention": float(scores[i]),
                     "attention_percentile": round(float(p), 3)}
                    for i, p in enumerate(percentile_rank(scores))])
        except Exception as error:  # noqa: BLE001 - one bad annotation file never stops the cohort
            row["status"], row["error"] = "failed", " ".join(str(error).split())[:300]
            logger.warning("localisation of %s: %s", slide.slide_id, row["error"])
        rows.append(row)
    summary = summarise(rows, top_k, n_bootstrap)
    summary["min_overlap"] = float(min_overlap)
    summary["failed_slides"] = [f"{r['slide_id']}: {r['error']}" for r in rows if r["status"] != "ok"]
    summary = nan_to_none(summary)
    write_csv(output_dir / "localisation_slides.csv", rows)
    write_json(output_dir / "localisation_summary.json", summary)
    if summary["n_slides"]:
        logger.info("localisation over %d annotated positive slide(s): attention AUC %s, top-%d hit rate %s, "
                    "attention mass on annotations %s", summary["n_slides"], _fmt(summary["attention_auc"]), top_k,
                    _fmt(summary["top_k_hit_rate"]), _fmt(summary["attention_mass_on_annotations"]))
    return summary


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------- helpers
def bag_attention(model, features) -> np.ndarray | None:
    """Attention (N,) of one bag (N, D) under a MIL network with ``forward_packed`` (eval mode, no
    gradients), or None when the network defines no attention (mean / max pooling)."""
    features = features if torch.is_tensor(features) else torch.as_tensor(np.asarray(features), dtype=torch.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flat = features.to(device).float()
            if hasattr(model, "forward_packed"):
                out = model.forward_packed(flat, torch.zeros(flat.shape[0], dtype=torch.long, device=device), 1)
                attention = out.get("attention") if isinstance(out, dict) else None
            elif hasattr(model, "forward_with_attention"):
                _, attention = model.forward_with_attention(flat.T.unsqueeze(0))
            else:
                attention = None
    finally:
        model.train(was_training)
    return None if attention is None else attention.detach().reshape(-1).double().cpu().numpy()


def patch_geometry(feature_file: str | Path) -> tuple[np.ndarray, float]:
    """Level-0 patch corners (N, 2) and patch side of a feature file (bundle, CLAM or TRIDENT layout).

    The patch side comes from :func:`scripts.formats.feature_file.patch_geometry` (the file's attributes,
    else the patch file beside it), the one place that decides it for inference too.
    """
    feature_file = Path(feature_file)
    _, coords = read_features(feature_file)
    geometry = file_geometry(feature_file, feature_file.stem, OutputLayout(feature_file.parent.parent).root)
    if geometry.patch_size_level0 is None:
        raise ValueError(f"{feature_file}: cannot tell the patch size in level-0 pixels (no patch_size_level0 "
                         "attribute and no patch file beside it); re-run preprocessing")
    return np.asarray(coords).reshape(-1, 2), float(geometry.patch_size_level0)


__all__ = [
    "SUMMARY_KEYS", "patch_overlap", "slide_localisation", "patient_bootstrap_mean_ci", "summarise", "SlideAttention",
    "localise_cohort", "bag_attention", "patch_geometry",
]  # fmt: skip
