"""Inference on raw slides: slide -> tissue patches -> features -> SMILE (fold ensemble) -> outputs.

Run by ``configs/inference.json``, an overlay on the extraction and preprocessing configs (their encoder,
reader, tissue and patch-grid blocks are used as they are, with every override they take)::

    python -m monai.bundle run \
        --config_file "['configs/extract.json','configs/preprocess.json','configs/inference.json']" \
        --meta_file configs/metadata.json --logging_file configs/logging.conf \
        --datalist <csv> --output_dir <dir> [--checkpoints <train_out>/cv]

(in that order: the slide reader is preprocess.json's). ``configs/inference.json`` alone holds the network
(``network_def``), the dataset and the evaluator ids the Model Zoo tools read.

Per slide it writes (all atomically)::

    <output_dir>/attention/<slide_id>.h5        coords (N,2) level-0 x,y; attention (N,); attention_percentile
    <output_dir>/heatmaps/<slide_id>.png        attention percentile over the thumbnail, with a colour bar
    <output_dir>/heatmaps/<slide_id>_topk.png   the k most attended patches
    <output_dir>/geojson/<slide_id>.geojson     one QuPath tile per patch with the attention as measurements

and, for the whole run, ``predictions.csv`` (slide_id, probability, predicted_label, threshold, n_patches,
n_models, status, error) and ``inference_timings.csv`` (seconds per stage per slide). A slide that fails
gets ``status=failed`` and the error; the others go on.

Slides with annotations (datalist column ``annotations``: a QuPath GeoJSON export) get the annotation
outlines drawn on their heat map, and the run writes the localisation outputs of
:func:`scripts.metrics.localisation.localise_cohort`: ``localisation/<slide_id>.csv`` (per patch: overlap
with the annotations, attention), ``localisation_slides.csv`` and ``localisation_summary.json``
(attention AUC, top-k hit rate, attention mass on annotations over annotated positive slides).

The patch and feature stages are the bundle's preprocessing and feature-extraction code
(:class:`PatchStage`, :class:`FeatureStage`); a slide whose feature file already exists (datalist column
``features``, or ``<output_dir>/features/<slide_id>.h5`` from an earlier run) skips them.

Models: ``checkpoints`` is a training checkpoint (``<train_out>/cv/model.pt``), a training output folder
(``<train_out>/cv``: every ``fold*/model.pt`` is used and their probabilities and attention are
averaged), a list of files, or ``models/model.pt`` (the state_dict of ``network_def``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from scripts.heldout import check_overlap
from scripts.formats.checkpoints import CheckpointError, load_into_network, resolve_checkpoints  # noqa: F401
from scripts.attention_outputs import write_slide_outputs
from scripts.datalist import SlideRecord, load_datalist
from scripts.formats.feature_file import (  # noqa: F401 - read_features re-exported
    OVERRIDE, FeatureExpectation, FeatureFileError, check_features, feature_candidates, feature_info,
    find_feature_file, patch_geometry, read_features,
)
from scripts.errors import raise_if_all_failed
from scripts.formats.layout import OutputLayout
from scripts.io_utils import write_csv

# the config-file list of the inference workflow (see the module docstring)
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


# ------------------------------------------------------------------------------------------- checkpoints
# one home: scripts.formats.checkpoints (resolve_checkpoints, load_into_network; weights_only=True loads)
load_checkpoint_model = load_into_network


# ------------------------------------------------------------------------------------------------ model
@torch.inference_mode()
def predict_bag(
    models: Sequence[nn.Module], features: torch.Tensor, device: torch.device | str = "cpu",
    inferer: Callable | None = None,
) -> tuple[float, np.ndarray, list[float]]:
    """Probability (mean over models of sigmoid(logit)), attention (N,) (mean over models; sums to 1),
    and each model's probability. ``features`` is (N, D); models take channel-first (1, D, N) bags."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"a bag needs at least one patch feature (N, D); got shape {tuple(features.shape)}")
    bag = features.to(device, non_blocking=True).T.unsqueeze(0)  # (1, D, N), a view: no copy on CPU
    attention = torch.zeros(features.shape[0], dtype=torch.float64)
    probs = []
    for model in models:
        call = model.forward_with_attention
        logits, att = inferer(bag, call) if inferer is not None else call(bag)
        probs.append(float(torch.sigmoid(logits.float()).reshape(-1)[0]))
        attention += att.reshape(-1).double().cpu()
    attention /= len(models)
    return float(np.mean(probs)), attention.numpy(), probs


# ------------------------------------------------------------------------------------------ slide access
def open_slide_for_outputs(path: str | Path, slide_id: str, mpp: float | None = None):
    """An open slide with ``dimensions``, ``thumbnail(max_size)`` and ``read_region((x, y), (w, h), level)``."""
    from scripts.wsi.open import open_slide

    return open_slide(path, slide_id=slide_id, mpp=mpp, require_mpp=False)


# ------------------------------------------------------------------------------------------------ stages
class PatchStage:
    """Slide -> tissue patch grid, with the preprocessing workflow's own per-slide function.

    Returns ``(patch file, {"read": s, "tissue": s, "grid": s})``; raises when the slide has no usable
    patch (failed or no tissue), so that slide is reported and the run goes on.
    """

    def __init__(self, settings, output_dir: str | Path) -> None:
        self.settings = settings  # scripts.preprocess.PreprocessSettings
        self.output_dir = Path(output_dir)

    def __call__(self, record: SlideRecord) -> tuple[Path, dict]:
        from scripts.preprocess import preprocess_slide

        start = time.perf_counter()
        row = preprocess_slide(record, self.settings, self.output_dir)
        total = time.perf_counter() - start
        if row.get("status") != "ok" or not row.get("patch_file"):
            raise RuntimeError(f"preprocessing: {row.get('status')}: {row.get('error') or row.get('warning')}")
        timings = {}
        for stage in ("read", "tissue", "grid"):
            value = row.get(f"seconds_{stage}")
            if value not in (None, ""):
                timings[stage] = float(value)
        if not timings and not str(row.get("warning", "")).startswith("skipped"):
            timings["read"] = total  # a preprocessing row without the split: the whole step counts as reading
        # (an existing patch file is reused: no read/tissue/grid time to report)
        return Path(row["patch_file"]), timings


class FeatureStage:
    """Patch grid -> feature file, with :func:`scripts.extract.extract_slide` (one slide at a time).

    ``encoder`` is a callable that builds the encoder (``build_encoder`` with ``"_mode_": "callable"``): it is
    built on the first slide that needs it, so parsing the config needs no weights file.
    ``slide_transforms``: extract.json's ``extract_transforms`` (open + batched reading; None: the default).
    ``encoder_transform``: extract.json's encoder preprocessing (None: the encoder's own).
    ``precision``: extract.json's ``precision`` (``auto``/``bf16``/``fp32``), so features made during
    inference are computed like the training cohort's.
    """

    def __init__(self, encoder: Callable[[], Any], output_dir: str | Path, device: torch.device | str = "cpu",
                 batch_size: int = 32, num_workers: int = 2, reader_backend: str = "auto", num_threads: int = 0,
                 overwrite: bool = False, progress: bool = False, slide_transforms: Callable | None = None,
                 precision: str = "auto", encoder_transform: Callable | None = None) -> None:
        self.encoder_factory = encoder
        self.output_dir = Path(output_dir)
        self.num_threads = int(num_threads)
        self.options = dict(device=device, batch_size=batch_size, num_workers=num_workers,
                            reader_backend=reader_backend, overwrite=overwrite, progress=progress,
                            slide_transforms=slide_transforms, precision=precision,
                            encoder_transform=encoder_transform)
        self._encoder = None

    def __call__(self, record: SlideRecord, patch_file: Path) -> tuple[Path, float]:
        from scripts.extract import configure_torch, extract_slide

        start = time.perf_counter()
        if self._encoder is None:
            self._encoder = self.encoder_factory() if callable(self.encoder_factory) and not hasattr(
                self.encoder_factory, "feature_dim") else self.encoder_factory
            configure_torch(self.options["device"], self.num_threads, 1)
            transform = self.options["encoder_transform"]
            if transform is not None and getattr(transform, "encoder", None) is self.encoder_factory:
                transform.encoder = self._encoder  # the config's transform names the lazy factory: bind the built encoder
        row = extract_slide(record, self._encoder, self.output_dir, **self.options)
        if row["status"] not in ("ok", "skipped"):
            raise RuntimeError(f"feature extraction: {row['status']}: {row['error']}")
        return OutputLayout(self.output_dir).feature_file(record.slide_id), time.perf_counter() - start


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
    """The inference workflow ("evaluator" of configs/inference.json).

    Args:
        dataset: :class:`SlideDataset` (or any sequence of :class:`SlideRecord`).
        network_def: the bag classifier (``scripts.networks.bag_classifier.BagClassifier``); its
            architecture is used for checkpoints that are bare state_dicts.
        inferer: a MONAI inferer (``SimpleInferer``) that runs each model on a bag.
        checkpoints: file, folder of folds or list (see :func:`resolve_checkpoints`).
        output_dir: where every output goes (the shared layout: patches/, features/ are reused).
        device: torch device for the MIL head.
        threshold: probability threshold for ``predicted_label``; None = the mean of the checkpoints'
            validation (Youden) thresholds when they carry one, else 0.5.
        patch_stage: callable ``(record) -> (patch_file, {"read": s, "tissue": s, "grid": s})``, or None
            when every slide already has features.
        feature_stage: callable ``(record, patch_file) -> (feature_file, seconds)``, or None.
        top_k: patches in the top-k picture (0 = none).
        thumbnail_size: longer side of the heat-map thumbnail in pixels.
        feature_dirs: folders of existing feature files (CLAM's results folder with ``h5_files/`` /
            ``pt_files/``, a TRIDENT job's magnification folder with ``features_<encoder>/``), searched
            after the datalist's ``features`` column and before the patch/feature stages
            (:func:`scripts.formats.feature_file.find_feature_file`).
        feature_checks: refuse features whose encoder, feature dimension or patch scale differ from what
            the models were trained on (False: warn and go on, at the user's risk).
        patch_size, target_mpp: the configured patch (pixels at µm/px): the last resort for the level-0
            patch size of features without it, and the expected scale for checkpoints that do not record one.
    """

    def __init__(
        self,
        dataset,
        network_def: nn.Module,
        inferer: Callable | None,
        checkpoints,
        output_dir: str | Path,
        device: torch.device | str = "cpu",
        threshold: float | None = None,
        patch_stage: Callable | None = None,
        feature_stage: Callable | None = None,
        top_k: int = 8,
        thumbnail_size: int = 1024,
        feature_dirs: Sequence[str | Path] | str | None = None,
        feature_checks: bool = True,
        patch_size: int | None = None,
        target_mpp: float | None = None,
    ) -> None:
        self.dataset = dataset
        self.network_def = network_def
        self.inferer = inferer
        self.checkpoints = checkpoints
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.threshold = threshold
        self.patch_stage = patch_stage
        self.feature_stage = feature_stage
        self.top_k = int(top_k)
        self.thumbnail_size = int(thumbnail_size)
        self.models: list[nn.Module] = []
        self.model_extras: list[dict] = []
        dirs = [feature_dirs] if isinstance(feature_dirs, (str, Path)) else list(feature_dirs or [])
        self.feature_dirs = [Path(d) for d in dirs if d not in (None, "")]
        self.feature_checks = _flag(feature_checks)
        settings = getattr(patch_stage, "settings", None)
        self.patch_size = patch_size if patch_size is not None else getattr(settings, "patch_size", None)
        self.target_mpp = target_mpp if target_mpp is not None else getattr(settings, "target_mpp", None)
        self.expected = FeatureExpectation()
        self._localisation: list = []  # SlideAttention of annotated slides

    # -------------------------------------------------------------------------------------------- setup
    def load_models(self) -> None:
        paths = resolve_checkpoints(self.checkpoints)
        self.models, self.model_extras = [], []
        for path in paths:
            model, extras = load_checkpoint_model(path, self.network_def)
            self.models.append(model.to(self.device))
            self.model_extras.append(extras)
        if self.threshold is None:
            fold_thresholds = [float(e["threshold"]) for e in self.model_extras
                               if isinstance(e.get("threshold"), (int, float)) and math.isfinite(e["threshold"])]
            self.threshold = float(np.mean(fold_thresholds)) if fold_thresholds else 0.5
        self.expected = FeatureExpectation.from_checkpoints(self.model_extras)
        if self.expected.feature_dim is None:
            dims = {int(e["feature_dim"]) for e in self.model_extras if isinstance(e.get("feature_dim"), int)}
            self.expected.feature_dim = dims.pop() if len(dims) == 1 else None
        if self.expected.target_mpp is None and self.target_mpp:
            self.expected.target_mpp = float(self.target_mpp)  # checkpoints without a record: the configured scale
            if self.expected.patch_size is None and self.patch_size:
                self.expected.patch_size = int(self.patch_size)
        logger.info("%d model(s) from %s; threshold %.3f", len(self.models),
                    ", ".join(str(p) for p in paths), self.threshold)

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> list[dict]:
        records = list(self.dataset.records if hasattr(self.dataset, "records") else self.dataset)
        self.load_models()
        # slides of patients a fold model trained or validated on: predicted, with a warning (scripts.heldout)
        check_overlap(records, [(f"model {i}", e) for i, e in enumerate(self.model_extras)], self.checkpoints,
                      refuse=False, what="inference")  # fmt: skip
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
            from scripts.metrics.localisation import localise_cohort

            localise_cohort(self._localisation, self.output_dir, top_k=self.top_k or 8)
        failed = [r for r in results if r.status != "ok"]
        logger.info("predictions for %d slide(s) in %s%s", len(results) - len(failed), layout.predictions,
                    f"; {len(failed)} failed: " + ", ".join(r.slide_id for r in failed) if failed else "")
        raise_if_all_failed(rows, "inference", layout.predictions)
        return rows

    def run_slide(self, record: SlideRecord) -> SlideResult:
        result = SlideResult(record.slide_id, threshold=float(self.threshold), n_models=len(self.models))
        try:
            feature_file = self._features_for(record, result.timings)
            start = time.perf_counter()
            geometry = self._check_features(record, feature_file)
            features, coords = read_features(feature_file, slide_id=record.slide_id,
                                             patch_folders=[OutputLayout(self.output_dir).patches_dir])
            result.n_patches = int(features.shape[0])
            probability, attention, _ = predict_bag(self.models, features, self.device, self.inferer)
            del features
            result.timings["mil"] = time.perf_counter() - start
            result.probability = probability
            result.predicted_label = int(probability >= self.threshold)
            start = time.perf_counter()
            self._write_outputs(record, feature_file, coords, attention, probability, geometry)
            result.timings["outputs"] = time.perf_counter() - start
            if record.annotations is not None:
                from scripts.metrics.localisation import SlideAttention

                self._localisation.append(SlideAttention(
                    record.slide_id, record.patient_id, record.label, coords, float(geometry.patch_size_level0),
                    attention, Path(record.annotations)))
        except Exception as error:  # noqa: BLE001 - one bad slide never stops the batch
            result.status, result.error = "failed", " ".join(str(error).split())[:500] or type(error).__name__
            logger.debug("slide %s failed", record.slide_id, exc_info=True)
        return result

    def _features_for(self, record: SlideRecord, timings: dict) -> Path:
        """The datalist's ``features`` file, else one found in ``feature_dirs``, else the patch and feature
        stages (which reuse complete files), else ``<output_dir>/features/<slide_id>.h5|.pt``."""
        if record.features is not None:
            if not Path(record.features).is_file():
                raise FeatureFileError(f"feature file {record.features} of slide {record.slide_id} (datalist column "
                                       "'features') does not exist")
            return Path(record.features)
        found = find_feature_file(record.slide_id, None, None, self.feature_dirs) if self.feature_dirs else None
        if found is not None:
            return found
        if self.patch_stage is None or self.feature_stage is None:
            existing = find_feature_file(record.slide_id, None, self.output_dir)
            if existing is not None:
                return existing
            looked = feature_candidates(record.slide_id, self.output_dir, self.feature_dirs)
            raise FileNotFoundError(f"no features for slide {record.slide_id} (looked for {', '.join(map(str, looked))}) "
                                    "and the inference config has no patch/feature stage")
        patch_file, patch_timings = self.patch_stage(record)
        timings.update(patch_timings)
        feature_file, seconds = self.feature_stage(record, patch_file)
        timings["features"] = seconds
        return Path(feature_file)

    def _geometry(self, record: SlideRecord, feature_file: Path, info):
        geometry = patch_geometry(feature_file, record.slide_id, self.output_dir, record.mpp, self.patch_size,
                                  self.target_mpp, info)
        if geometry.footprint_um is None and record.mpp is None \
                and record.path is not None and Path(record.path).exists():
            try:  # the slide's own mpp (CLAM files do not record it)
                with open_slide_for_outputs(record.path, record.slide_id) as slide:
                    mpp = slide.mpp
            except Exception:  # noqa: BLE001 - the outputs step reports an unreadable slide
                mpp = None
            if mpp:
                geometry = patch_geometry(feature_file, record.slide_id, self.output_dir, mpp, self.patch_size,
                                          self.target_mpp, info)
        return geometry

    def _check_features(self, record: SlideRecord, feature_file: Path):
        """Encoder, dimension, rows and scale of the slide's features vs the models; returns the geometry."""
        info = feature_info(feature_file)
        geometry = self._geometry(record, feature_file, info)
        try:
            for note in check_features(info, self.expected, geometry):
                logger.info("%s: %s", record.slide_id, note)
        except FeatureFileError as error:
            if self.feature_checks or "no override" in str(error):
                raise
            logger.warning("%s: %s (feature_checks=false: going on)", record.slide_id, error)
        return geometry

    def _write_outputs(self, record: SlideRecord, feature_file: Path, coords: np.ndarray, attention: np.ndarray,
                       probability: float, geometry=None) -> None:
        if geometry is None:
            geometry = self._geometry(record, feature_file, feature_info(feature_file))
        if geometry.patch_size_level0 is None:
            raise FeatureFileError(
                f"{feature_file}: cannot tell the patch size in level-0 pixels: the file has no patch_size_level0 "
                f"(or CLAM patch_level/downsample) attribute, no patch file was found beside it or in "
                f"{self.output_dir / 'patches'}, and the slide's mpp is unknown; put the patches/ folder beside the "
                "features, or give the slide's mpp in the datalist")
        patch_size_level0 = float(geometry.patch_size_level0)
        logger.debug("%s: patch size %.1f level-0 px from %s", record.slide_id, patch_size_level0, geometry.source)
        attrs = {"probability": probability, "threshold": float(self.threshold), "n_models": len(self.models),
                 "feature_file": str(feature_file), "patch_size_level0_source": geometry.source}
        if record.path is None:  # features only: no slide to draw on; attention and GeoJSON still written
            from scripts.attention_outputs import write_attention_h5, write_geojson

            write_attention_h5(OutputLayout(self.output_dir).attention_file(record.slide_id), coords, attention,
                               patch_size_level0, attrs=dict(attrs, slide_id=record.slide_id))
            write_geojson(OutputLayout(self.output_dir).geojson(record.slide_id), coords, attention,
                          patch_size_level0, slide_id=record.slide_id)
            return
        with open_slide_for_outputs(record.path, record.slide_id, record.mpp) as slide:
            width, height = slide.dimensions
            thumbnail = slide.thumbnail(self.thumbnail_size)
            downsample = (width / thumbnail.shape[1], height / thumbnail.shape[0])
            side = int(round(patch_size_level0))

            def read_patch(x: int, y: int) -> np.ndarray:
                return slide.read_region((x, y), (side, side), 0)

            write_slide_outputs(self.output_dir, record.slide_id, coords, attention, patch_size_level0, thumbnail,
                                downsample, (width, height), read_patch=read_patch, probability=probability,
                                top_k=self.top_k, attrs=dict(attrs, slide_path=str(record.path)),
                                annotations=_annotations_or_none(record))

    def _print_slide(self, i: int, n: int, result: SlideResult) -> None:
        times = " | ".join(f"{s} {result.timings[s]:.2f}s" for s in STAGES if s in result.timings)
        if result.status == "ok":
            verdict = "STAS" if result.predicted_label == 1 else "no STAS"
            logger.info("[%d/%d] %s: P(STAS)=%.3f -> %s (threshold %.2f, %d patches) | %s", i, n, result.slide_id,
                        result.probability, verdict, result.threshold, result.n_patches, times)
        else:
            logger.error("[%d/%d] %s: FAILED (%s)%s", i, n, result.slide_id, result.error, f" | {times}" if times else "")


def _flag(value) -> bool:
    """A true/false option; on the command line ``false`` arrives as the string "false"."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "")
    return bool(value)
def _annotations_or_none(record: SlideRecord):
    """The slide's annotations for the heat map, or None (a bad annotation file is reported by the
    localisation step; it never costs the slide its prediction or heat map)."""
    if record.annotations is None:
        return None
    from scripts.formats.annotations import AnnotationError, read_annotations

    try:
        return read_annotations(record.annotations)
    except AnnotationError as error:
        logger.warning("slide %s: annotations not drawn: %s", record.slide_id, error)
        return None


# -------------------------------------------------------------------------------------------------- CLI
def subset_datalist(datalist: str, out: str, n_slides: int = 3, add: Sequence[str] | str = (), n_positive: int = 0) -> None:
    """Write a datalist with the first ``n_slides`` rows of ``datalist`` (of which the first ``n_positive``
    labelled-positive rows come first) plus the slide files in ``add`` (those that exist; slide_id = file
    stem). Paths become absolute. Used by ``make demo``::

        python -m scripts.inference subset_datalist --datalist data/demo/cohort/datalist.csv \\
            --out data/demo/out/inference_datalist.csv --n_slides 3 --add ../shared/data/slides/cmu-1-small-region.svs
    """
    records = load_datalist(datalist, require_labels=False)
    positives = [r for r in records if r.label == 1][: int(n_positive)]
    records = (positives + [r for r in records if r not in positives])[: int(n_slides)]
    rows = [dict(r.as_row(), path=str(Path(r.path).resolve()) if r.path else "") for r in records]
    for path in [add] if isinstance(add, str) else list(add):
        path = Path(path)
        if path.is_file():
            rows.append({"slide_id": path.stem, "path": str(path.resolve()), "label": "", "patient_id": path.stem,
                         "center": "external", "mpp": "", "features": ""})
        else:
            logger.warning("%s not found; left out of %s", path, out)
    for row in rows:
        if row.get("annotations"):
            row["annotations"] = str(Path(row["annotations"]).resolve())
    write_csv(out, rows, ["slide_id", "path", "label", "patient_id", "center", "mpp", "features", "annotations"])
    print(f"{out}: {len(rows)} slide(s)")


if __name__ == "__main__":
    import fire

    fire.Fire({"subset_datalist": subset_datalist})
