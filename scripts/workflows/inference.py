"""The inference workflow: a datalist of slides (or feature files) -> predictions, attention, heat maps, GeoJSON.

``configs/inference.json`` is complete on its own (the file the Model Zoo tools, MONAI Label and MONAI Deploy
load)::

    python -m monai.bundle run --config_file configs/inference.json \
        --datalist <csv> --output_dir <dir> [--checkpoints <train_out>/cv]

It declares the slide reader, the slide -> patch-grid ``Compose`` (``slide_transforms``), the patch-reading
``Compose`` (``extract_transforms``), the encoder, the network and the :class:`scripts.workflows.predict.SlidePredictor`
that ties them together; the blocks it shares with ``preprocess.json`` / ``extract.json`` are written out
here and kept equal to those files by a test (tests/test_inference.py), so every override those files take
(``--patch_size``, ``--tissue#min_saturation``, ``--reader_backend``, ``--num_workers``, ``--precision``,
``--decode_device``) works the same here. The old config-file list
``['configs/extract.json','configs/preprocess.json','configs/inference.json']`` still runs (later files win).

Each slide goes through :meth:`scripts.workflows.predict.SlidePredictor.predict_record` (the public per-slide API, also
``scripts.workflows.predict.predict_slide``); this module is the loop over the datalist. Per slide it writes (all
atomically) ``attention/<slide_id>.h5``, ``heatmaps/<slide_id>.png`` and ``_topk.png``,
``geojson/<slide_id>.geojson``; for the run ``predictions.csv`` (slide_id, probability, predicted_label,
threshold, n_patches, n_models, status, error) and ``inference_timings.csv`` (seconds per stage per slide). A
slide that fails gets ``status=failed`` and the error; the others go on.

Slides with annotations (datalist column ``annotations``: a QuPath GeoJSON export) get the annotation
outlines drawn on their heat map, and the run writes the localisation outputs of
:func:`scripts.metrics.localisation.localise_cohort` (``localisation/<slide_id>.csv``,
``localisation_slides.csv``, ``localisation_summary.json``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scripts.data.datalist import SlideRecord, load_datalist
from scripts.data.heldout import check_overlap
from scripts.formats.layout import OutputLayout
from scripts.metrics.localisation import SlideAttention, localise_cohort
from scripts.utils.errors import raise_if_all_failed
from scripts.utils.io_utils import write_csv
from scripts.workflows.predict import (
    SlidePredictor,
)

# the former config-file list (still runs; configs/inference.json alone is complete)
INFERENCE_CONFIGS = "['configs/extract.json','configs/preprocess.json','configs/inference.json']"

logger = logging.getLogger(__name__)

STAGES = ("read", "tissue", "grid", "features", "mil", "outputs")

# ----------------------------------------------------------------------------------------------- dataset
class SlideDataset(torch.utils.data.Dataset):
    """The datalist as a dataset of slide records. Labels are optional (inference).

    The CSV is read and validated on first use, not at construction, so a bundle config can be parsed
    (e.g. by ``monai.bundle`` property checks) before the datalist exists.
    """

    def __init__(self, datalist: str | Path, require_labels: bool = False, check_files: bool = True) -> None:
        self.datalist = Path(datalist)
        self.require_labels = require_labels
        self.check_files = check_files
        self._records: list[SlideRecord] | None = None

    @property
    def records(self) -> list[SlideRecord]:
        if self._records is None:
            self._records = load_datalist(self.datalist, require_labels=self.require_labels,
                                          check_files=self.check_files, require_slides=False)
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SlideRecord:
        return self.records[index]


# --------------------------------------------------------------------------------------------- workflow
@dataclass
class SlideResult:
    slide_id: str
    probability: float = math.nan
    predicted_label: int | str = ""
    threshold: float = math.nan
    n_patches: int = 0
    n_models: int = 0
    status: str = "ok"
    error: str = ""
    timings: dict = field(default_factory=dict)

    def row(self) -> dict:
        prob = "" if math.isnan(self.probability) else round(self.probability, 6)
        return {"slide_id": self.slide_id, "probability": prob, "predicted_label": self.predicted_label,
                "threshold": "" if math.isnan(self.threshold) else round(self.threshold, 6),
                "n_patches": self.n_patches, "n_models": self.n_models, "status": self.status, "error": self.error}


class SlideInference:
    """The inference workflow ("evaluator" of configs/inference.json): ``predictor`` on every slide of
    ``dataset`` (a :class:`SlideDataset` or any sequence of :class:`SlideRecord`), then the run's tables and
    the localisation outputs. Outputs go to ``predictor.output_dir``."""

    def __init__(self, dataset, predictor: SlidePredictor) -> None:
        self.dataset = dataset
        self.predictor = predictor
        self.output_dir = Path(predictor.output_dir)
        self._localisation: list = []  # SlideAttention of annotated slides

    @property
    def threshold(self) -> float | None:
        return self.predictor.threshold

    def run(self) -> list[dict]:
        records = list(self.dataset.records if hasattr(self.dataset, "records") else self.dataset)
        self.predictor.load()
        # slides of patients a fold model trained or validated on: predicted, with a warning (scripts.data.heldout)
        check_overlap(records, [(f"model {i}", e) for i, e in enumerate(self.predictor.model_extras)],
                      self.predictor.checkpoints, refuse=False, what="inference")
        self._localisation = []
        results: list[SlideResult] = []
        for i, record in enumerate(records, 1):
            result = self.run_slide(record)
            results.append(result)
            self._print_slide(i, len(records), result)
        rows = [r.row() for r in results]
        layout = OutputLayout(self.output_dir)
        write_csv(layout.predictions, rows)
        write_csv(layout.inference_timings,
                  [{"slide_id": r.slide_id, **{s: round(r.timings.get(s, 0.0), 3) for s in STAGES},
                    "total": round(sum(r.timings.values()), 3)} for r in results])
        if self._localisation:
            localise_cohort(self._localisation, self.output_dir, top_k=self.predictor.top_k or 8)
        failed = [r for r in results if r.status != "ok"]
        logger.info("predictions for %d slide(s) in %s%s", len(results) - len(failed), layout.predictions,
                    f"; {len(failed)} failed: " + ", ".join(r.slide_id for r in failed) if failed else "")
        raise_if_all_failed(rows, "inference", layout.predictions)
        return rows

    def run_slide(self, record: SlideRecord) -> SlideResult:
        """One slide through the predictor; a failure becomes the slide's row (the run goes on)."""
        self.predictor.load()  # once: a checkpoint that cannot be loaded stops the run, not one slide
        result = SlideResult(record.slide_id, threshold=float(self.predictor.threshold),
                             n_models=len(self.predictor.models))
        try:
            prediction = self.predictor.predict_record(record)
        except Exception as error:  # noqa: BLE001 - one bad slide never stops the batch
            result.status, result.error = "failed", " ".join(str(error).split())[:500] or type(error).__name__
            logger.debug("slide %s failed", record.slide_id, exc_info=True)
            return result
        result.timings = prediction.timings
        result.n_patches = prediction.n_patches
        result.probability = prediction.probability
        result.predicted_label = prediction.decision
        if record.annotations is not None:
            self._localisation.append(SlideAttention(
                record.slide_id, record.patient_id, record.label, prediction.coords, prediction.patch_size_level0,
                prediction.attention, Path(record.annotations)))
        return result

    def _print_slide(self, i: int, n: int, result: SlideResult) -> None:
        times = " | ".join(f"{s} {result.timings[s]:.2f}s" for s in STAGES if s in result.timings)
        if result.status == "ok":
            verdict = "STAS" if result.predicted_label == 1 else "no STAS"
            logger.info("[%d/%d] %s: P(STAS)=%.3f -> %s (threshold %.2f, %d patches) | %s", i, n, result.slide_id,
                        result.probability, verdict, result.threshold, result.n_patches, times)
        else:
            logger.error("[%d/%d] %s: FAILED (%s)%s", i, n, result.slide_id, result.error, f" | {times}" if times else "")
