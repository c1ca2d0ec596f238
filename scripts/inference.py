"""Inference on raw slides: slide -> tissue patches -> features -> SMILE (fold ensemble) -> outputs.

Run by ``configs/inference.json``::

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --datalist <csv> --output_dir <dir> [--checkpoints <train_out>/cv]

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

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from torch import nn

from scripts.errors import BundleError
from scripts.attention_outputs import write_slide_outputs
from scripts.datalist import SlideRecord, load_datalist
from scripts.io_utils import write_csv

logger = logging.getLogger(__name__)

STAGES = ("read", "tissue", "grid", "features", "mil", "outputs")


class CheckpointError(BundleError, ValueError):
    """No usable model checkpoint; the message names the path and what to do."""


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
def resolve_checkpoints(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand ``checkpoints`` (file, folder of ``fold*/model.pt``, or list) into checkpoint files."""
    items = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            folds = sorted(path.glob("fold*/model.pt"), key=lambda p: _fold_number(p.parent.name))
            if not folds and (path / "cv").is_dir():
                folds = sorted((path / "cv").glob("fold*/model.pt"), key=lambda p: _fold_number(p.parent.name))
            if not folds and (path / "model.pt").is_file():
                folds = [path / "model.pt"]
            if not folds:
                raise CheckpointError(f"no fold*/model.pt or model.pt under {path}; train first "
                                      "(configs/train.json) or pass --checkpoints <file>")
            found.extend(folds)
        else:
            raise CheckpointError(f"checkpoint {path} does not exist; train first (configs/train.json writes "
                                  "<output_dir>/cv/fold<k>/model.pt), publish one to models/model.pt "
                                  "(python -m scripts.publish_model), or pass --checkpoints <path>")
    if not found:
        raise CheckpointError("no checkpoints given; pass --checkpoints <file or folder>")
    return found


def _fold_number(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def load_checkpoint_model(path: str | Path, network_def: nn.Module) -> tuple[nn.Module, dict]:
    """Build the bag classifier of one checkpoint; returns (model in eval mode, checkpoint extras).

    Accepts a training checkpoint ``{"model": state_dict, "network": {"name", "kwargs"}, ...}`` (the
    architecture comes from the checkpoint and is wrapped like ``network_def``), or a plain state_dict
    of ``network_def`` / of its MIL network (``models/model.pt``).
    """
    from scripts.networks.bag_classifier import BagClassifier

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    extras: dict = {}
    state = checkpoint
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state = checkpoint["model"]
        extras = {k: v for k, v in checkpoint.items() if k != "model"}
    info = path.with_name(path.stem + "_info.json")  # written beside models/model.pt by scripts.publish_model
    if not extras and info.is_file():
        import json

        extras = {k: v for k, v in json.loads(info.read_text()).items() if k != "network"}
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict (expected a training checkpoint or a state_dict)")
    spec = extras.get("network")
    if isinstance(spec, dict) and spec.get("name"):
        channel_first = getattr(network_def, "channel_first", True)
        model = BagClassifier(spec["name"], channel_first=channel_first, **dict(spec.get("kwargs") or {}))
    else:
        model = copy.deepcopy(network_def)
    try:
        if hasattr(model, "load_mil_state_dict"):
            model.load_mil_state_dict(state, strict=True)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the network ({type(model).__name__}); "
                              f"was it trained with other network settings? {error}") from error
    return model.eval(), extras


# ------------------------------------------------------------------------------------------------ model
def read_features(path: str | Path, rows_per_read: int = 4096) -> tuple[torch.Tensor, np.ndarray]:
    """Features (N, D) float32 tensor and coords (N, 2), read in row blocks into one preallocated array."""
    with h5py.File(path, "r") as handle:
        if "features" not in handle or "coords" not in handle:
            raise ValueError(f"{path} needs datasets 'features' (N, D) and 'coords' (N, 2)")
        dataset = handle["features"]
        n, d = dataset.shape
        features = torch.empty((n, d), dtype=torch.float32)
        view = features.numpy()
        for start in range(0, n, rows_per_read):
            stop = min(n, start + rows_per_read)
            view[start:stop] = dataset[start:stop]
        coords = handle["coords"][()]
    if coords.shape != (n, 2):
        raise ValueError(f"{path}: coords shape {coords.shape} does not match {n} feature rows")
    return features, coords


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
    from scripts.wsi.reader import open_slide

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
    """Patch grid -> feature file, with the feature-extraction workflow (one slide at a time).

    ``encoder`` is a callable that builds the encoder (``build_encoder`` with ``"_mode_": "callable"``): it is
    built on the first slide that needs it, so parsing the config needs no weights file.
    """

    def __init__(self, encoder: Callable[[], Any], output_dir: str | Path, device: torch.device | str = "cpu",
                 batch_size: int = 32, num_workers: int = 2, reader_backend: str = "auto", num_threads: int = 0,
                 overwrite: bool = False, progress: bool = False) -> None:
        self.encoder_factory = encoder
        self.output_dir = Path(output_dir)
        self.options = dict(device=device, batch_size=batch_size, num_workers=num_workers,
                            reader_backend=reader_backend, num_threads=num_threads, overwrite=overwrite, progress=progress, distributed=False)
        self._workflow = None

    def __call__(self, record: SlideRecord, patch_file: Path) -> tuple[Path, float]:
        from scripts.extract import FeatureExtractionWorkflow

        start = time.perf_counter()
        if self._workflow is None:
            encoder = self.encoder_factory() if callable(self.encoder_factory) and not hasattr(
                self.encoder_factory, "feature_dim") else self.encoder_factory
            self._workflow = FeatureExtractionWorkflow(datalist="", output_dir=self.output_dir, encoder=encoder,
                                                       **self.options)
            self._workflow._configure_torch(1)
        row = self._workflow._extract([record], 0, 1)[0]
        if row["status"] not in ("ok", "skipped"):
            raise RuntimeError(f"feature extraction: {row['status']}: {row['error']}")
        return self.output_dir / "features" / f"{record.slide_id}.h5", time.perf_counter() - start


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
        logger.info("%d model(s) from %s; threshold %.3f", len(self.models),
                    ", ".join(str(p) for p in paths), self.threshold)

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> list[dict]:
        records = list(self.dataset.records if hasattr(self.dataset, "records") else self.dataset)
        self.load_models()
        self._localisation = []
        results: list[SlideResult] = []
        for i, record in enumerate(records, 1):
            result = self.run_slide(record)
            results.append(result)
            self._print_slide(i, len(records), result)
        rows = [r.row() for r in results]
        write_csv(self.output_dir / "predictions.csv", rows)
        write_csv(self.output_dir / "inference_timings.csv",
                  [{"slide_id": r.slide_id, **{s: round(r.timings.get(s, 0.0), 3) for s in STAGES},
                    "total": round(sum(r.timings.values()), 3)} for r in results])
        if self._localisation:
            from scripts.metrics.localisation import localise_cohort

            localise_cohort(self._localisation, self.output_dir, top_k=self.top_k or 8)
        failed = [r for r in results if r.status != "ok"]
        logger.info("predictions for %d slide(s) in %s%s", len(results) - len(failed), self.output_dir / "predictions.csv",
                    f"; {len(failed)} failed: " + ", ".join(r.slide_id for r in failed) if failed else "")
        return rows

    def run_slide(self, record: SlideRecord) -> SlideResult:
        result = SlideResult(record.slide_id, threshold=float(self.threshold), n_models=len(self.models))
        try:
            feature_file = self._features_for(record, result.timings)
            start = time.perf_counter()
            features, coords = read_features(feature_file)
            result.n_patches = int(features.shape[0])
            probability, attention, _ = predict_bag(self.models, features, self.device, self.inferer)
            del features
            result.timings["mil"] = time.perf_counter() - start
            result.probability = probability
            result.predicted_label = int(probability >= self.threshold)
            start = time.perf_counter()
            self._write_outputs(record, feature_file, coords, attention, probability)
            result.timings["outputs"] = time.perf_counter() - start
            if record.annotations is not None:
                from scripts.metrics.localisation import SlideAttention

                self._localisation.append(SlideAttention(
                    record.slide_id, record.patient_id, record.label, coords, self._patch_size(record, feature_file),
                    attention, Path(record.annotations)))
        except Exception as error:  # noqa: BLE001 - one bad slide never stops the batch
            result.status, result.error = "failed", " ".join(str(error).split())[:500] or type(error).__name__
            logger.debug("slide %s failed", record.slide_id, exc_info=True)
        return result

    def _features_for(self, record: SlideRecord, timings: dict) -> Path:
        if record.features is not None and Path(record.features).suffix in (".h5", ".hdf5"):
            return Path(record.features)
        existing = self.output_dir / "features" / f"{record.slide_id}.h5"
        if self.patch_stage is None or self.feature_stage is None:
            if existing.is_file():
                return existing
            raise FileNotFoundError(f"no features for slide {record.slide_id} ({existing} is missing) and the "
                                    "inference config has no patch/feature stage")
        patch_file, patch_timings = self.patch_stage(record)
        timings.update(patch_timings)
        feature_file, seconds = self.feature_stage(record, patch_file)
        timings["features"] = seconds
        return Path(feature_file)

    def _patch_size(self, record: SlideRecord, feature_file: Path) -> float:
        return _patch_size_level0(feature_file, self.output_dir / "patches" / f"{record.slide_id}.h5")

    def _write_outputs(self, record: SlideRecord, feature_file: Path, coords: np.ndarray, attention: np.ndarray,
                       probability: float) -> None:
        patch_size_level0 = self._patch_size(record, feature_file)
        attrs = {"probability": probability, "threshold": float(self.threshold), "n_models": len(self.models),
                 "feature_file": str(feature_file)}
        if record.path is None:  # features only: no slide to draw on; attention and GeoJSON still written
            from scripts.attention_outputs import write_attention_h5, write_geojson

            write_attention_h5(self.output_dir / "attention" / f"{record.slide_id}.h5", coords, attention,
                               patch_size_level0, attrs=dict(attrs, slide_id=record.slide_id))
            write_geojson(self.output_dir / "geojson" / f"{record.slide_id}.geojson", coords, attention,
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


def _patch_size_level0(feature_file: Path, patch_file: Path) -> float:
    """Level-0 side of one patch, from the feature file's or the patch file's attributes."""
    for path in (feature_file, patch_file):
        if path.is_file():
            with h5py.File(path, "r") as handle:
                attrs = dict(handle.attrs)
                for ds in ("coords", "features"):
                    if ds in handle:
                        attrs = {**dict(handle[ds].attrs), **attrs}
            if "patch_size_level0" in attrs:
                return float(attrs["patch_size_level0"])
            if "patch_size" in attrs and "level_downsample" in attrs:
                return float(attrs["patch_size"]) * float(attrs["level_downsample"])
            if "patch_size" in attrs and "mpp" in attrs and "target_mpp" in attrs:
                return float(attrs["patch_size"]) * float(attrs["target_mpp"]) / float(attrs["mpp"])
    raise ValueError(f"cannot tell the patch size in level-0 pixels: neither {feature_file} nor {patch_file} has a "
                     "'patch_size_level0' attribute (re-run preprocessing)")


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
