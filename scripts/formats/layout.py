"""Every path of a bundle output folder, named in one place.

All workflows share one output folder (``--output_dir``); each writes its own part of it::

    patches/<slide>.h5            preprocess: patch coordinates (bundle / CLAM / TRIDENT attributes)
    previews/<slide>.png          preprocess: tissue mask and grid over a thumbnail
    preprocess_summary.csv        preprocess: one row per slide
    features/<slide>.h5           extract: (N, D) features + coords
    extract_summary.csv           extract: one row per slide
    splits.json                   training: patient-level folds
    cv/                           training: fold<k>/model.pt, summary.json, oof_predictions.csv, roc.png
    evaluation/                   evaluate: predictions.csv, summary.json, roc.png
    compare/ ablation/ transfer/  method comparison, SMILE ablation, cross-centre transfer
    predictions.csv               inference: one row per slide
    inference_timings.csv         inference: seconds per stage per slide
    attention/<slide>.h5          inference: attention per patch
    heatmaps/<slide>.png          inference: attention heat map (and <slide>_topk.png)
    geojson/<slide>.geojson       inference: QuPath tiles with attention measurements

A stage asks ``OutputLayout(output_dir).patch_file(slide_id)`` instead of spelling the folder out, so
renaming a folder or reading another tool's layout is a change here only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputLayout:
    """The paths of one output folder; nothing is created until a ``ensure`` call or a writer does it."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # -------------------------------------------------------------------------------- preprocess
    @property
    def patches_dir(self) -> Path:
        return self.root / "patches"

    def patch_file(self, slide_id: str) -> Path:
        return self.patches_dir / f"{slide_id}.h5"

    @property
    def previews_dir(self) -> Path:
        return self.root / "previews"

    def preview(self, slide_id: str) -> Path:
        return self.previews_dir / f"{slide_id}.png"

    @property
    def preprocess_summary(self) -> Path:
        return self.root / "preprocess_summary.csv"

    # ----------------------------------------------------------------------------------- extract
    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def feature_file(self, slide_id: str) -> Path:
        return self.features_dir / f"{slide_id}.h5"

    @property
    def extract_summary(self) -> Path:
        return self.root / "extract_summary.csv"

    # ---------------------------------------------------------------------------------- training
    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def cv_dir(self) -> Path:
        return self.root / "cv"

    def fold_dir(self, fold: int) -> Path:
        return self.cv_dir / f"fold{int(fold)}"

    def fold_checkpoint(self, fold: int) -> Path:
        return self.fold_dir(fold) / "model.pt"

    @property
    def cv_summary(self) -> Path:
        return self.cv_dir / "summary.json"

    @property
    def oof_predictions(self) -> Path:
        return self.cv_dir / "oof_predictions.csv"

    # ------------------------------------------------------------------- evaluate / compare family
    @property
    def evaluation_dir(self) -> Path:
        return self.root / "evaluation"

    @property
    def compare_dir(self) -> Path:
        return self.root / "compare"

    @property
    def ablation_dir(self) -> Path:
        return self.root / "ablation"

    @property
    def transfer_dir(self) -> Path:
        return self.root / "transfer"

    # --------------------------------------------------------------------------------- inference
    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def inference_timings(self) -> Path:
        return self.root / "inference_timings.csv"

    @property
    def attention_dir(self) -> Path:
        return self.root / "attention"

    def attention_file(self, slide_id: str) -> Path:
        return self.attention_dir / f"{slide_id}.h5"

    @property
    def heatmaps_dir(self) -> Path:
        return self.root / "heatmaps"

    def heatmap(self, slide_id: str) -> Path:
        return self.heatmaps_dir / f"{slide_id}.png"

    def topk(self, slide_id: str) -> Path:
        return self.heatmaps_dir / f"{slide_id}_topk.png"

    @property
    def geojson_dir(self) -> Path:
        return self.root / "geojson"

    def geojson(self, slide_id: str) -> Path:
        return self.geojson_dir / f"{slide_id}.geojson"

    # ------------------------------------------------------------------------------------ helpers
    def ensure(self, *folders: Path) -> None:
        """Create the given folders (e.g. ``layout.ensure(layout.features_dir)``)."""
        for folder in folders:
            Path(folder).mkdir(parents=True, exist_ok=True)


def layout_of(output_dir: str | os.PathLike | OutputLayout) -> OutputLayout:
    """``output_dir`` as an :class:`OutputLayout` (an existing layout is returned unchanged)."""
    return output_dir if isinstance(output_dir, OutputLayout) else OutputLayout(output_dir)
