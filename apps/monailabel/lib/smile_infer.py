"""SMILE as a MONAI Label infer task: one whole-slide prediction per slide, answered tile by tile.

MONAI Label's ``/infer/wsi_v2/<model>`` endpoint (what QuPath's and DSA's extensions call) cuts the
requested region into tiles (``tile_size``, 1024 px by default) and calls the task once per tile with that
tile's level-0 ``location`` and ``size``. A slide-level MIL model cannot answer one tile on its own: its
attention is a softmax over the whole slide. So the task runs :class:`scripts.workflows.predict.SlidePredictor` once
per slide - the bundle's own reader, tissue mask, patch grid, encoder and fold ensemble, the same code as
``configs/inference.json`` - keeps the :class:`~scripts.workflows.predict.SlidePrediction` in memory (keyed by the
slide file's path, size and modification time, the µm/px used and the predictor's model fingerprint), and
for each tile returns:

* the tile's patches merged per attention tier (``Attention high`` = top 10 % of the slide's patches,
  ``medium`` = next 40 %, ``low``) into a few hole-free polygons (:func:`scripts.formats.attention_outputs.tier_outlines`);
* on the first tile only, one element whose label carries the slide's result, e.g.
  ``SMILE: STAS predicted, P(STAS)=0.612, threshold 0.516``, outlined by the bounding box of the slide's
  tissue patches (a label is the only text ASAP XML and the QuPath extension carry per polygon).

The result's ``params`` (``output=json``) also hold the prediction's summary (probability, threshold,
decision, patch count, model fingerprint, the output files written under the app's output folder).

Errors are :class:`fastapi.HTTPException` with a one-line ``detail`` (MONAI Label has no handler of its own
for exceptions raised by a task, so anything else reaches the client as a bare "Internal Server Error").
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from scripts.formats.attention_outputs import ATTENTION_TIERS, tier_outlines
from scripts.utils.errors import BundleError

logger = logging.getLogger(__name__)

RESULT_COLOUR = (40, 40, 40)
RESULT_LABELS = ("SMILE: STAS predicted", "SMILE: no STAS")


def result_label(prediction) -> str:
    """The result element's label: decision, P(STAS) and threshold (plus a warning for random weights)."""
    decision = RESULT_LABELS[0] if prediction.decision else RESULT_LABELS[1]
    label = f"{decision}, P(STAS)={prediction.probability:.3f}, threshold {prediction.threshold:.3f}"
    if prediction.random_encoder:
        label += " [random-weight encoder: not a diagnosis]"
    return label


def tissue_box(prediction, slide_size: tuple[int, int] | None) -> list[list[float]]:
    """Closed ring around all of the slide's patches (level-0 px), clipped to the slide."""
    coords, side = prediction.coords, prediction.patch_size_level0
    x0, y0 = float(coords[:, 0].min()), float(coords[:, 1].min())
    x1, y1 = float(coords[:, 0].max() + side), float(coords[:, 1].max() + side)
    if slide_size is not None:
        x1, y1 = min(x1, float(slide_size[0])), min(y1, float(slide_size[1]))
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


class SmileInfer(InferTask):
    """MONAI Label infer task over a :class:`scripts.workflows.predict.SlidePredictor` (built lazily, loaded once).

    Args:
        predictor_factory: returns the loaded predictor (called once, on the first request or by ``warm_up``).
        description: shown by ``/info/`` and in the annotation file.
        device: reported in the task's config ("cpu"/"cuda"); ``multi_gpu`` is always false, because MONAI
            Label's per-GPU tile split divides by the GPU count (zero on a CPU host) and the model is loaded
            once anyway.
    """

    def __init__(self, predictor_factory, description: str, device: str = "cpu") -> None:
        labels = {name: i + 1 for i, (_, name, _) in enumerate(ATTENTION_TIERS)}
        for label in RESULT_LABELS:
            labels[label] = len(labels) + 1
        super().__init__(InferType.CLASSIFICATION, labels, 2, description,
                         config={"multi_gpu": False, "device": device, "max_workers": 1})
        self._factory = predictor_factory
        self._predictor = None
        self._lock = threading.Lock()
        self._slide_locks: dict[tuple, threading.Lock] = {}
        self._predictions: dict[tuple, Any] = {}

    # --------------------------------------------------------------------------------------- MONAI Label
    def is_valid(self) -> bool:
        return True

    def get_path(self, validate=True):
        checkpoints = getattr(self._predictor, "checkpoint_paths", None)
        return str(checkpoints[0]) if checkpoints else None

    @property
    def predictor(self):
        with self._lock:
            if self._predictor is None:
                self._predictor = self._factory()
            return self._predictor

    def __call__(self, request: dict) -> tuple[None, dict]:
        start = time.perf_counter()
        image = request.get("image")
        if not isinstance(image, str) or not Path(image).is_file():
            raise HTTPException(404, f"image {request.get('image')!r} is not a slide file in the studies folder")
        slide_id = str(request.get("smile_image_id") or Path(image).stem)
        mpp = request.get("mpp")
        prediction, predicted = self.prediction(Path(image), slide_id, float(mpp) if mpp else None)
        pre = time.perf_counter() - start

        start = time.perf_counter()
        slide_size = request.get("smile_slide_size")
        region = None
        if request.get("location") is not None and request.get("size") is not None:
            (x, y), (w, h) = request["location"], request["size"]
            downsample = float(request.get("smile_level_downsample") or 1.0)
            region = (float(x), float(y), float(w) * downsample, float(h) * downsample)
        labels, elements = {}, []
        for name, colour, rings in tier_outlines(prediction.coords, prediction.attention, prediction.patch_size_level0,
                                                 region=region, slide_size=slide_size):
            labels[name] = list(colour)
            elements.append({"label": name, "contours": rings})
        if int(request.get("id", 0) or 0) == 0:
            label = result_label(prediction)
            labels[label] = list(RESULT_COLOUR)
            elements.append({"label": label, "contours": [tissue_box(prediction, slide_size)]})
        post = time.perf_counter() - start
        total = pre + post
        params = {
            "annotation": {"labels": labels, "elements": elements},
            "prediction": prediction.summary(),
            "latencies": {"pre": round(pre, 3), "infer": round(pre if predicted else 0.0, 3),
                          "invert": 0.0, "post": round(post, 3), "write": 0.0, "total": round(total, 3),
                          "transform": {}},
        }
        return None, params

    # ------------------------------------------------------------------------------------------ caching
    def prediction(self, path: Path, slide_id: str, mpp: float | None):
        """The slide's :class:`~scripts.workflows.predict.SlidePrediction`, computed once per (file, µm/px, model).

        Returns (prediction, computed_now). Tiles of one slide asked for at the same time wait for the
        first one's computation instead of repeating it."""
        predictor = self.predictor
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, mpp, predictor.fingerprint)
        with self._lock:
            slide_lock = self._slide_locks.setdefault(key, threading.Lock())
        with slide_lock:
            if key in self._predictions:
                return self._predictions[key], False
            try:
                prediction = predictor.predict(slide=path, slide_id=slide_id, mpp=mpp)
            except BundleError as error:
                hint = ""
                if mpp is None and "microns-per-pixel" in str(error):
                    hint = ("; on this server, give the slide's level-0 µm/px with the request instead: "
                            'wsi params {"mpp": 0.25}')
                raise HTTPException(422, _one_line(f"slide {path.name}: {error}{hint}", 900)) from None
            self._predictions[key] = prediction
            logger.info("%s: P(STAS)=%.3f threshold %.3f (%d patches, %s)", slide_id, prediction.probability,
                        prediction.threshold, prediction.n_patches,
                        ", ".join(f"{k} {v:.1f}s" for k, v in prediction.timings.items()))
            return prediction, True


def _one_line(text: str, limit: int = 600) -> str:
    return " ".join(str(text).split())[:limit]
