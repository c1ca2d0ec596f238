"""One slide in, one prediction out: the bundle's public per-slide inference API.

::

    from scripts.workflows.predict import predict_slide

    pred = predict_slide("slides/S001.svs", "out/cv")          # a raw slide: patches -> features -> SMILE
    pred = predict_slide("features/S001.h5", "out/cv")         # a feature file (bundle, CLAM or TRIDENT)
    pred.probability, pred.threshold, pred.decision             # P(STAS), the operating threshold, 0/1
    pred.coords, pred.attention                                 # (N, 2) level-0 x, y of each patch; (N,) sums to 1
    pred.outputs                                                # {"attention": ..h5, "heatmap": ..png, "geojson": ...}

:class:`SlidePredictor` is built from ``configs/inference.json`` (``predictor``), so a slide goes through the
same reader, tissue mask, patch grid, encoder and fold ensemble as ``python -m monai.bundle run --config_file
configs/inference.json``; its fold models are loaded once and its encoder is built on the first raw slide, then
both are reused by every later call. ``predict_slide`` keeps one predictor per (checkpoints, output folder,
overrides), so repeated calls pay for the models once. The inference workflow
(:class:`scripts.workflows.inference.SlideInference`), the MONAI Label app (``apps/monailabel``) and any clinical
wrapper call :meth:`SlidePredictor.predict_record` / :meth:`SlidePredictor.predict`.

Per slide it writes (all atomically) under the output folder, as the workflow does::

    attention/<slide_id>.h5        coords (N,2) level-0 x,y; attention (N,); attention_percentile
    heatmaps/<slide_id>.png        attention percentile over the thumbnail (slides only), _topk.png beside it
    geojson/<slide_id>.geojson     one QuPath tile per patch with the attention as measurements
    patches/<slide_id>.h5, features/<slide_id>.h5   for raw slides (reused by later calls on the same file)

Models: ``checkpoints`` is a training checkpoint (``<train_out>/cv/fold0/model.pt``), a training output folder
(``<train_out>/cv``: every ``fold*/model.pt``; probabilities and attention are averaged), a list of files, or
``models/model.pt`` (the state_dict of ``network_def``), loaded by :class:`scripts.engines.ensemble.FoldEnsemble`; the
threshold, when not given, is that component's rule (``ENSEMBLE_THRESHOLD_RULE``, the same as evaluation's).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np
import torch
from monai.bundle import ConfigParser
from torch import nn

from scripts.data.datalist import SlideRecord
from scripts.engines.ensemble import FoldEnsemble, predict_bag
from scripts.formats.annotations import AnnotationError, read_annotations
from scripts.formats.attention_outputs import percentile_rank, write_attention_h5, write_geojson, write_slide_outputs
from scripts.formats.feature_file import (
    FeatureExpectation,
    FeatureFileError,
    check_features,
    feature_candidates,
    feature_info,
    find_feature_file,
    patch_geometry,
    read_features,
)
from scripts.formats.layout import OutputLayout
from scripts.networks.encoders import RANDOM_WEIGHTS
from scripts.utils.errors import BundleError
from scripts.workflows.extract import configure_torch, extract_slide
from scripts.workflows.preprocess import preprocess_slide
from scripts.wsi.open import open_slide

logger = logging.getLogger(__name__)

INFERENCE_CONFIG = "configs/inference.json"
FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt")


class PredictionError(BundleError):
    """A slide (or feature file) that cannot be predicted: the message names the file and the reason."""


# ------------------------------------------------------------------------------------------------ slides
def open_slide_for_outputs(path: str | Path, slide_id: str, mpp: float | None = None):
    """An open slide with ``dimensions``, ``thumbnail(max_size)`` and ``read_region((x, y), (w, h), level)``."""
    return open_slide(path, slide_id=slide_id, mpp=mpp, require_mpp=False)


# ------------------------------------------------------------------------------------------------ stages
class PatchStage:
    """Slide -> tissue patch grid, with the preprocessing workflow's own per-slide function.

    ``settings`` is a :class:`scripts.workflows.preprocess.PreprocessSettings` (inference.json's ``settings``, whose
    ``transforms`` is the slide -> patch-grid ``Compose``). Returns ``(patch file, {"read": s, "tissue": s,
    "grid": s})``; raises when the slide has no usable patch (failed or no tissue).
    """

    def __init__(self, settings, output_dir: str | Path) -> None:
        self.settings = settings
        self.output_dir = Path(output_dir)

    def __call__(self, record: SlideRecord) -> tuple[Path, dict]:
        start = time.perf_counter()
        row = preprocess_slide(record, self.settings, self.output_dir)
        total = time.perf_counter() - start
        if row.get("status") != "ok" or not row.get("patch_file"):
            reason = row.get("error") or row.get("warning") or "no reason recorded"
            raise PredictionError(f"preprocessing {record.path}: {row.get('status')}: {reason}")
        timings = {}
        for stage in ("read", "tissue", "grid"):
            value = row.get(f"seconds_{stage}")
            if value not in (None, ""):
                timings[stage] = float(value)
        if not timings and not str(row.get("warning", "")).startswith("skipped"):
            timings["read"] = total  # a preprocessing row without the split: the whole step counts as reading
        return Path(row["patch_file"]), timings


class FeatureStage:
    """Patch grid -> feature file, with :func:`scripts.workflows.extract.extract_slide` (one slide at a time).

    ``encoder`` is a callable that builds the encoder (``build_encoder`` with ``"_mode_": "callable"``): it is
    built on the first slide that needs it and kept, so parsing the config needs no weights file.
    ``slide_transforms``: the open + batched-reading ``Compose`` (inference.json's ``extract_transforms``).
    ``encoder_transform``: the encoder preprocessing (None: the encoder's own). ``precision``:
    ``auto``/``bf16``/``fp32``, so features made here are computed like the training cohort's.
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
        self._lock = threading.Lock()

    @property
    def encoder(self):
        """The encoder, built on first use (a server may call this from several threads)."""
        with self._lock:
            if self._encoder is None:
                factory = self.encoder_factory
                self._encoder = factory() if callable(factory) and not hasattr(factory, "feature_dim") else factory
                configure_torch(self.options["device"], self.num_threads, 1)
                transform = self.options["encoder_transform"]
                if transform is not None and getattr(transform, "encoder", None) is factory:
                    transform.encoder = self._encoder  # the config's transform names the lazy factory: bind it
            return self._encoder

    def __call__(self, record: SlideRecord, patch_file: Path) -> tuple[Path, float]:
        start = time.perf_counter()
        row = extract_slide(record, self.encoder, self.output_dir, **self.options)
        if row["status"] not in ("ok", "skipped"):
            raise PredictionError(f"feature extraction of {record.path}: {row['status']}: {row['error']}")
        return OutputLayout(self.output_dir).feature_file(record.slide_id), time.perf_counter() - start


# ------------------------------------------------------------------------------------------- prediction
@dataclass
class SlidePrediction:
    """What one slide's inference gives.

    ``coords`` are the level-0 top-left x, y of each patch (int64, N x 2), ``patch_size_level0`` their side in
    level-0 pixels; ``attention`` (N,) sums to 1 (mean over the fold models); ``attention_percentile`` (N,) is
    each patch's within-slide percentile rank divided by 100, in [0, 1] (1 = most attended; the files store
    it x100). ``decision`` is ``int(probability >= threshold)``. ``random_encoder`` is True when the features
    came from a random-weight encoder (demo/tests: the probability means nothing). ``outputs`` names the files
    written (``attention``, ``geojson``, ``heatmap``, ``topk``, ``features``, ``patches``).
    """

    slide_id: str
    probability: float
    threshold: float
    decision: int
    coords: np.ndarray
    attention: np.ndarray
    patch_size_level0: float
    n_models: int
    mpp: float | None = None
    random_encoder: bool = False
    model_fingerprint: str = ""
    outputs: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return int(self.coords.shape[0])

    @property
    def attention_percentile(self) -> np.ndarray:
        return percentile_rank(self.attention) / 100.0

    def summary(self) -> dict:
        """JSON-ready scalars (no per-patch arrays)."""
        return {"slide_id": self.slide_id, "probability": self.probability, "threshold": self.threshold,
                "decision": self.decision, "n_patches": self.n_patches, "n_models": self.n_models,
                "patch_size_level0": self.patch_size_level0, "mpp": self.mpp, "random_encoder": self.random_encoder,
                "model_fingerprint": self.model_fingerprint, "outputs": {k: str(v) for k, v in self.outputs.items()}}


class SlidePredictor:
    """The fold ensemble plus the slide -> features stages, loaded once and reused for every slide.

    Args:
        network_def: the bag classifier (``scripts.networks.bag_classifier.BagClassifier``); its architecture
            is used for checkpoints that are bare state_dicts.
        inferer: a MONAI inferer (``SimpleInferer``) that runs each model on a bag, or None.
        checkpoints: file, folder of folds or list (:func:`scripts.formats.checkpoints.resolve_checkpoints`).
        output_dir: where every output goes (patches/, features/ are reused across calls); None: a temporary
            folder kept for the predictor's lifetime.
        device: torch device for the MIL head.
        threshold: operating threshold; None = :data:`scripts.engines.ensemble.ENSEMBLE_THRESHOLD_RULE`.
        patch_stage, feature_stage: :class:`PatchStage` / :class:`FeatureStage` (None: feature files only).
        top_k: patches in the top-k picture (0 = none).
        thumbnail_size: longer side of the heat-map thumbnail in pixels.
        feature_dirs: folders of existing feature files (CLAM ``h5_files/``/``pt_files/``, TRIDENT
            ``features_<encoder>/``) searched before the patch/feature stages.
        feature_checks: refuse features whose encoder, dimension or patch scale differ from the models'.
        patch_size, target_mpp: the configured patch; the last resort for the level-0 patch size of features
            without it, and the expected scale for checkpoints that do not record one.
        write_outputs: write the attention file, heat maps and GeoJSON (False: return the prediction only).
    """

    def __init__(
        self,
        network_def: nn.Module,
        inferer: Callable | None,
        checkpoints,
        output_dir: str | Path | None = None,
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
        write_outputs: bool = True,
    ) -> None:
        self.network_def = network_def
        self.inferer = inferer
        self.checkpoints = checkpoints
        self._tmp = tempfile.TemporaryDirectory(prefix="smile-predict-") if output_dir in (None, "") else None
        self.output_dir = Path(self._tmp.name if self._tmp is not None else output_dir)
        self.device = torch.device(device)
        self.requested_threshold = threshold
        self.threshold = threshold
        self.patch_stage = patch_stage
        self.feature_stage = feature_stage
        self.top_k = int(top_k)
        self.thumbnail_size = int(thumbnail_size)
        dirs = [feature_dirs] if isinstance(feature_dirs, (str, Path)) else list(feature_dirs or [])
        self.feature_dirs = [Path(d) for d in dirs if d not in (None, "")]
        self.feature_checks = flag(feature_checks)
        settings = getattr(patch_stage, "settings", None)
        self.patch_size = patch_size if patch_size is not None else getattr(settings, "patch_size", None)
        self.target_mpp = target_mpp if target_mpp is not None else getattr(settings, "target_mpp", None)
        self.write_outputs = flag(write_outputs)
        self.ensemble: FoldEnsemble | None = None
        self.models: list[nn.Module] = []
        self.model_extras: list[dict] = []
        self.threshold_record: dict = {}
        self.checkpoint_paths: list[Path] = []
        self.expected = FeatureExpectation()
        self._fingerprint: str | None = None
        self._overrides: dict | None = None  # from_config's overrides (part of the fingerprint)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, checkpoints, output_dir: str | Path | None = None, bundle_root: str | Path | None = None,
                    overrides: Mapping[str, Any] | None = None, config_file: str | Path | None = None) -> "SlidePredictor":
        """``configs/inference.json``'s ``predictor`` with ``checkpoints``, ``output_dir`` and ``overrides``
        (config ids -> values, as on the command line: ``{"patch_size": 512, "tissue#min_saturation": 20,
        "encoder_weights": "w.pth"}``). ``bundle_root`` defaults to this bundle's folder."""
        root = Path(bundle_root) if bundle_root is not None else Path(__file__).resolve().parents[2]
        parser = ConfigParser()
        parser.read_config(str(Path(config_file) if config_file is not None else root / INFERENCE_CONFIG))
        tmp = tempfile.TemporaryDirectory(prefix="smile-predict-") if output_dir in (None, "") else None
        values = {"bundle_root": str(root), "checkpoints": _plain_checkpoints(checkpoints),
                  "output_dir": str(tmp.name if tmp is not None else output_dir)}
        values.update(dict(overrides or {}))
        parser.update(values)
        predictor = parser.get_parsed_content("predictor")
        if tmp is not None:
            predictor._tmp = tmp  # removed with the predictor
        predictor._overrides = {k: v for k, v in values.items() if k != "output_dir"}
        return predictor

    # -------------------------------------------------------------------------------------------- models
    def load(self) -> "SlidePredictor":
        """Load the fold models (once; later calls return at once) into the :class:`FoldEnsemble`, whose
        threshold rule (the same as evaluation's) gives the operating threshold unless one was given."""
        with self._lock:
            if self.models:
                return self
            ensemble = FoldEnsemble(self.checkpoints, self.network_def, self.device, self.requested_threshold).load()
            extras = ensemble.extras
            self.checkpoint_paths, self.model_extras = list(ensemble.paths), extras
            self.threshold, self.threshold_record = float(ensemble.threshold), ensemble.threshold_record
            self.expected = FeatureExpectation.from_checkpoints(extras)
            if self.expected.feature_dim is None:
                dims = {int(e["feature_dim"]) for e in extras if isinstance(e.get("feature_dim"), int)}
                self.expected.feature_dim = dims.pop() if len(dims) == 1 else None
            if self.expected.target_mpp is None and self.target_mpp:
                self.expected.target_mpp = float(self.target_mpp)  # checkpoints without a record: the configured scale
                if self.expected.patch_size is None and self.patch_size:
                    self.expected.patch_size = int(self.patch_size)
            self.ensemble = ensemble
            self.models = ensemble.models  # last: a half-loaded predictor is never visible
            logger.info("%d model(s) from %s; threshold %.3f (%s)", len(self.models),
                        ", ".join(map(str, ensemble.paths)), self.threshold, self.threshold_record.get("rule"))
            return self

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) over the checkpoint files' bytes, the threshold rule and the configuration
        overrides (encoder weights, patch settings): two predictors with the same fingerprint give the same
        prediction for the same slide. For caches keyed by slide + model."""
        if self._fingerprint is None:
            self.load()
            digest = hashlib.sha256()
            for path in self.checkpoint_paths:
                digest.update(_file_sha256(path).encode())
            stage = self.feature_stage
            factory = getattr(stage, "encoder_factory", None)
            encoder = dict(getattr(factory, "keywords", {}) or {})
            weights = encoder.get("weights")
            if weights and Path(str(weights)).is_file():
                encoder["weights"] = _file_sha256(Path(str(weights)))
            overrides = {k: v for k, v in (self._overrides or {}).items() if k != "checkpoints"}
            record = {"threshold": self.requested_threshold, "patch_size": self.patch_size,
                      "target_mpp": self.target_mpp, "encoder": encoder, "overrides": overrides}
            digest.update(json.dumps(record, sort_keys=True, default=str).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # ---------------------------------------------------------------------------------------- predicting
    def predict(self, slide: str | Path | None = None, features: str | Path | None = None,
                slide_id: str | None = None, mpp: float | None = None,
                annotations: str | Path | None = None) -> SlidePrediction:
        """Predict one slide (``slide``: a WSI file) or one feature file (``features``), or both (the slide is
        then used for the heat map and µm/px). ``slide_id`` defaults to the file's stem; ``mpp`` overrides the
        slide's level-0 µm/px. Raises :class:`PredictionError` (one line) for bad input."""
        if slide is None and features is None:
            raise PredictionError("predict: give a slide file or a feature file")
        for what, path in (("slide", slide), ("feature file", features), ("annotations", annotations)):
            if path is not None and not Path(path).is_file():
                raise PredictionError(f"{what} {path} does not exist")
        source = Path(slide if slide is not None else features)
        record = SlideRecord(slide_id or source.stem, Path(slide) if slide is not None else None, None,
                             slide_id or source.stem, "", mpp, Path(features) if features is not None else None,
                             annotations=Path(annotations) if annotations is not None else None)
        return self.predict_record(record)

    def predict_record(self, record: SlideRecord) -> SlidePrediction:
        """Predict one datalist record; raises on failure (the workflow catches it per slide)."""
        self.load()
        timings: dict = {}
        outputs: dict = {}
        feature_file = self._features_for(record, timings, outputs)
        start = time.perf_counter()
        geometry = self._check_features(record, feature_file)
        features, coords = read_features(feature_file, slide_id=record.slide_id,
                                         patch_folders=[OutputLayout(self.output_dir).patches_dir])
        with self._lock:  # one bag through the ensemble at a time (shared modules, eval mode)
            probability, attention, _ = self.ensemble.score_bag(features, self.inferer)
        del features
        timings["mil"] = time.perf_counter() - start
        if geometry.patch_size_level0 is None:
            raise FeatureFileError(
                f"{feature_file}: cannot tell the patch size in level-0 pixels: the file has no patch_size_level0 "
                f"(or CLAM patch_level/downsample) attribute, no patch file was found beside it or in "
                f"{self.output_dir / 'patches'}, and the slide's mpp is unknown; put the patches/ folder beside the "
                "features, or give the slide's mpp in the datalist")
        prediction = SlidePrediction(
            record.slide_id, probability, float(self.threshold), int(probability >= self.threshold),
            np.asarray(coords, dtype=np.int64).reshape(-1, 2), np.asarray(attention, dtype=np.float64),
            float(geometry.patch_size_level0), len(self.models), mpp=_level0_mpp(record, feature_file),
            random_encoder=_random_encoder(feature_file), model_fingerprint=self.fingerprint,
            outputs=outputs, timings=timings)
        if self.write_outputs:
            start = time.perf_counter()
            outputs.update(self._write_outputs(record, feature_file, prediction, geometry))
            timings["outputs"] = time.perf_counter() - start
        return prediction

    def _features_for(self, record: SlideRecord, timings: dict, outputs: dict) -> Path:
        """The record's ``features`` file, else one found in ``feature_dirs``, else the patch and feature
        stages (which reuse complete files), else ``<output_dir>/features/<slide_id>.h5|.pt``."""
        if record.features is not None:
            if not Path(record.features).is_file():
                raise FeatureFileError(f"feature file {record.features} of slide {record.slide_id} (datalist column "
                                       "'features') does not exist")
            return Path(record.features)
        found = find_feature_file(record.slide_id, None, None, self.feature_dirs) if self.feature_dirs else None
        if found is not None:
            return found
        if self.patch_stage is None or self.feature_stage is None or record.path is None:
            existing = find_feature_file(record.slide_id, None, self.output_dir)
            if existing is not None:
                return existing
            looked = feature_candidates(record.slide_id, self.output_dir, self.feature_dirs)
            raise FileNotFoundError(f"no features for slide {record.slide_id} (looked for {', '.join(map(str, looked))}) "
                                    "and the inference config has no patch/feature stage")
        patch_file, patch_timings = self.patch_stage(record)
        timings.update(patch_timings)
        outputs["patches"] = Path(patch_file)
        feature_file, seconds = self.feature_stage(record, patch_file)
        timings["features"] = seconds
        outputs["features"] = Path(feature_file)
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

    def _write_outputs(self, record: SlideRecord, feature_file: Path, prediction: SlidePrediction,
                       geometry) -> dict[str, Path]:
        layout = OutputLayout(self.output_dir)
        coords, attention, side = prediction.coords, prediction.attention, prediction.patch_size_level0
        attrs = {"probability": prediction.probability, "threshold": prediction.threshold,
                 "n_models": prediction.n_models, "feature_file": str(feature_file),
                 "patch_size_level0_source": geometry.source, "model_fingerprint": prediction.model_fingerprint}
        if record.path is None:  # features only: no slide to draw on; attention and GeoJSON still written
            return {
                "attention": write_attention_h5(layout.attention_file(record.slide_id), coords, attention, side,
                                                attrs=dict(attrs, slide_id=record.slide_id)),
                "geojson": write_geojson(layout.geojson(record.slide_id), coords, attention, side,
                                         slide_id=record.slide_id),
            }
        with open_slide_for_outputs(record.path, record.slide_id, record.mpp) as slide:
            width, height = slide.dimensions
            thumbnail = slide.thumbnail(self.thumbnail_size)
            downsample = (width / thumbnail.shape[1], height / thumbnail.shape[0])
            read_side = int(round(side))

            def read_patch(x: int, y: int) -> np.ndarray:
                return slide.read_region((x, y), (read_side, read_side), 0)

            return write_slide_outputs(self.output_dir, record.slide_id, coords, attention, side, thumbnail,
                                       downsample, (width, height), read_patch=read_patch,
                                       probability=prediction.probability, top_k=self.top_k,
                                       attrs=dict(attrs, slide_path=str(record.path)),
                                       annotations=_annotations_or_none(record))


# ----------------------------------------------------------------------------------------- the function
_PREDICTORS: dict[str, SlidePredictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def get_predictor(checkpoints, output_dir: str | Path | None = None, bundle_root: str | Path | None = None,
                  **overrides) -> SlidePredictor:
    """The cached :class:`SlidePredictor` for (checkpoints, output folder, bundle root, overrides)."""
    key = json.dumps([_plain_checkpoints(checkpoints), str(output_dir), str(bundle_root), overrides],
                     sort_keys=True, default=str)
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            _PREDICTORS[key] = SlidePredictor.from_config(checkpoints, output_dir, bundle_root, overrides).load()
        return _PREDICTORS[key]


def predict_slide(slide_or_features: str | Path, checkpoints, output_dir: str | Path | None = None, *,
                  slide_id: str | None = None, mpp: float | None = None, features: str | Path | None = None,
                  annotations: str | Path | None = None, bundle_root: str | Path | None = None,
                  **overrides) -> SlidePrediction:
    """Predict one slide file or one feature file (``.h5``/``.pt``: bundle, CLAM or TRIDENT layout) with the
    fold models in ``checkpoints``. ``overrides`` are inference.json ids (``patch_size=512``,
    ``encoder_weights="w.pth"``, ``**{"tissue#min_saturation": 20}``). Models and encoder are loaded on the
    first call and reused by later calls with the same checkpoints, output folder and overrides.
    Pass ``features=`` with a slide path to use existing features and the slide for heat maps."""
    predictor = get_predictor(checkpoints, output_dir, bundle_root, **overrides)
    path = Path(slide_or_features)
    if path.suffix.lower() in FEATURE_SUFFIXES and features is None:
        return predictor.predict(features=path, slide_id=slide_id, mpp=mpp, annotations=annotations)
    return predictor.predict(slide=path, features=features, slide_id=slide_id, mpp=mpp, annotations=annotations)


# ---------------------------------------------------------------------------------------------- helpers
def flag(value) -> bool:
    """A true/false option; on the command line ``false`` arrives as the string "false"."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "")
    return bool(value)


def _plain_checkpoints(checkpoints):
    if isinstance(checkpoints, (str, Path)):
        return str(checkpoints)
    return [str(c) for c in checkpoints]


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _random_encoder(feature_file: Path) -> bool:
    if Path(feature_file).suffix.lower() not in (".h5", ".hdf5"):
        return False
    try:
        with h5py.File(feature_file, "r") as handle:
            return str(handle.attrs.get("weights_sha256", "")) == RANDOM_WEIGHTS
    except OSError:
        return False


def _level0_mpp(record: SlideRecord, feature_file: Path) -> float | None:
    """The slide's level-0 µm/px when known: the record's, else the feature file's ``mpp`` attribute."""
    if record.mpp:
        return float(record.mpp)
    if Path(feature_file).suffix.lower() in (".h5", ".hdf5"):
        try:
            with h5py.File(feature_file, "r") as handle:
                value = handle.attrs.get("mpp")
                if value is not None and float(value) > 0:
                    return float(value)
        except (OSError, TypeError, ValueError):
            pass
    return None


def _annotations_or_none(record: SlideRecord):
    """The slide's annotations for the heat map, or None (a bad annotation file is reported by the
    localisation step; it never costs the slide its prediction or heat map)."""
    if record.annotations is None:
        return None

    try:
        return read_annotations(record.annotations)
    except AnnotationError as error:
        logger.warning("slide %s: annotations not drawn: %s", record.slide_id, error)
        return None


__all__ = ["FeatureStage", "PatchStage", "PredictionError", "SlidePrediction", "SlidePredictor", "get_predictor",
           "predict_bag", "predict_slide"]
