"""MONAI Label app serving this bundle's SMILE model to QuPath and Digital Slide Archive.

Start it (from the bundle root, with the bundle's ``.venv``; see docs/monailabel.md)::

    .venv/bin/python -m monailabel.main start_server --app apps/monailabel --studies /path/to/slides \\
        --conf models smile --conf checkpoints out/train/cv --conf encoder_weights models/ctranspath.pth \\
        --host 127.0.0.1 --port 8000

``--conf`` keys read here:

* ``models``: ``smile`` (the only model; ``all`` means the same);
* ``checkpoints``: a fold checkpoint, a training ``cv/`` folder or ``models/model.pt`` (default: the
  bundle's ``models/model.pt``);
* ``encoder_weights``: the CTransPath weights file (default: inference.json's ``models/ctranspath.pth``);
  ``allow_random_weights true`` runs with a random-weight encoder (tests and demos only; every result is
  then labelled "not a diagnosis");
* ``output_dir``: where patches, features, attention files, heat maps and GeoJSON go (default:
  ``<app>/model/outputs``, one sub-folder per studies folder);
* ``device``: ``cpu`` or ``cuda`` (default: cuda when available);
* ``threshold``: an operating threshold to use instead of the checkpoints' (ensemble rule);
* ``override.<inference.json id>``: any other inference.json value, e.g. ``--conf override.patch_size 512``
  or ``--conf override.mask_backend scipy``;
* ``preload``: ``true`` loads the models (not the encoder) at start-up instead of on the first request.

Images are the slides of the studies folder (MONAI Label's local datastore, with the whole-slide
extensions added). Requests for anything else - a path on the server's disk, an unknown image id, an
unknown model - are refused with one clear HTTP error; so is a slide that cannot be read or has no µm/px
(give it in the request's ``params``: ``{"mpp": 0.25}``). The server has no authentication: bind it to
127.0.0.1 unless it runs behind an authenticating proxy.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
BUNDLE_ROOT = APP_DIR.parents[1]
for path in (BUNDLE_ROOT, APP_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from lib.smile_infer import SmileInfer, _one_line  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException  # noqa: E402

from scripts.utils.errors import BundleError  # noqa: E402
from scripts.workflows.predict import SlidePredictor  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_NAME = "smile"
# whole-slide formats OpenSlide/cuCIM read, beyond MONAI Label's default list (*.svs, *.tif)
SLIDE_EXTENSIONS = ["*.svs", "*.tif", "*.tiff", "*.ndpi", "*.mrxs", "*.scn", "*.vms", "*.vmu", "*.bif", "*.svslide"]
RESERVED_CONF = {"models", "checkpoints", "encoder_weights", "allow_random_weights", "output_dir", "device",
                 "threshold", "preload"}


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class SmileApp(MONAILabelApp):
    """One infer task, ``smile``: whole-slide SMILE prediction returned as attention-tier polygons."""

    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        conf = dict(conf or {})
        models = str(conf.get("models", MODEL_NAME)).lower()
        if models not in (MODEL_NAME, "all"):
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"this app serves one model, '{MODEL_NAME}'; got --conf models "
                                      f"{models!r} (use --conf models {MODEL_NAME})")
        self.device = str(conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoints = str(conf.get("checkpoints") or BUNDLE_ROOT / "models" / "model.pt")
        studies_key = hashlib.sha256(str(Path(studies).resolve()).encode()).hexdigest()[:12]
        self.output_dir = Path(conf.get("output_dir") or Path(app_dir) / "model" / "outputs" / studies_key)
        self.overrides = {key[len("override."):]: value for key, value in conf.items() if key.startswith("override.")}
        if conf.get("encoder_weights"):
            self.overrides["encoder_weights"] = str(conf["encoder_weights"])
        if _truthy(conf.get("allow_random_weights", "false")):
            self.overrides["allow_random_weights"] = True
        if conf.get("threshold") not in (None, ""):
            self.overrides["decision_threshold"] = float(conf["threshold"])
        self.overrides["device"] = f"$torch.device('{self.device}')"
        unknown = sorted(k for k in conf if k not in RESERVED_CONF and not k.startswith("override."))
        if unknown:
            logger.warning("--conf keys not used by the SMILE app: %s", ", ".join(unknown))
        self.preload = _truthy(conf.get("preload", "false"))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="SMILE (STAS) for MONAI Label",
                         description="SMILE attention MIL: P(STAS) per slide and attention tiers per patch",
                         version="1.0")

    # ---------------------------------------------------------------------------------------- components
    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return LocalDatastore(self.studies, extensions=SLIDE_EXTENSIONS,
                              auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                              read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        task = SmileInfer(self._make_predictor, "SMILE attention MIL for STAS: P(STAS) and attention tiers",
                          device=self.device)
        if self.preload:
            task.predictor  # noqa: B018 - load now, fail at start-up
        return {MODEL_NAME: task}

    def _make_predictor(self):
        logger.info("SMILE: checkpoints %s; outputs in %s; overrides %s", self.checkpoints, self.output_dir,
                    self.overrides)
        try:
            return SlidePredictor.from_config(self.checkpoints, self.output_dir, BUNDLE_ROOT, self.overrides).load()
        except BundleError as error:
            raise HTTPException(503, _one_line(f"the SMILE model could not be loaded: {error}")) from None

    # ------------------------------------------------------------------------------------------ requests
    def _check_request(self, request: dict) -> None:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"no model {model!r} on this server; it serves: {', '.join(self._infers)}")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(400, "no image given: pass ?image=<image id> (see /datastore/?output=all)")
        uri = self.datastore().get_image_uri(image)
        if not uri:
            raise HTTPException(404, f"image {image!r} is not in this server's studies folder {self.studies} "
                                     "(only its slides are served; see /datastore/?output=all)")
        request["image"] = uri
        request["smile_image_id"] = image
        try:
            import openslide

            with openslide.OpenSlide(uri) as slide:
                request["smile_slide_size"] = tuple(int(v) for v in slide.dimensions)
                level = int(request.get("level") or 0)
                if level:
                    if not 0 <= level < slide.level_count:
                        raise HTTPException(422, f"image {image!r} has levels 0-{slide.level_count - 1}; got level {level}")
                    request["smile_level_downsample"] = float(slide.level_downsamples[level])
        except HTTPException:
            raise
        except Exception as error:  # OpenSlide's errors carry no common base class
            raise HTTPException(422, _one_line(f"image {image!r} ({Path(uri).name}) cannot be read as a whole-slide "
                                               f"image: {error}; check the file (re-export or re-copy it)")) from None

    def infer_wsi(self, request, datastore=None):
        self._check_request(request)
        try:
            return super().infer_wsi(request, datastore)
        except (HTTPException, MONAILabelException) as error:
            if isinstance(error, MONAILabelException):
                raise HTTPException(400, _one_line(error.msg)) from None
            raise
        except BundleError as error:
            raise HTTPException(422, _one_line(str(error))) from None

    def infer(self, request, datastore=None):
        if "smile_image_id" not in request:  # /infer/<model> directly (not through infer_wsi)
            self._check_request(request)
        try:
            return super().infer(request, datastore)
        except MONAILabelException as error:
            raise HTTPException(400, _one_line(error.msg)) from None
        except BundleError as error:
            raise HTTPException(422, _one_line(str(error))) from None
