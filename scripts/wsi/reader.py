"""The bundle's WSI reader as a MONAI component: :class:`SlideWSIReader` (``monai.data.wsi_reader.BaseWSIReader``).

It works wherever MONAI takes a WSI reader (``monai.data.PatchWSIDataset(data, reader=SlideWSIReader())``,
``MaskedPatchWSIDataset``, ``monai.transforms.LoadImaged(reader=...)``) and is declared in the bundle's
configs as ``{"_target_": "scripts.wsi.reader.SlideWSIReader", ...}``. Behind it:

* :mod:`scripts.wsi.probe`   crash-safe cuCIM probe (a child process opens the file first);
* :mod:`scripts.wsi.backends` one module per backend: cuCIM, OpenSlide (both through MONAI's readers),
  tifffile, DICOM;
* :mod:`scripts.wsi.open`    the fallback chain and the trusted resolution (:mod:`scripts.wsi.mpp`);
* :mod:`scripts.wsi.patches` batched patch-grid reading for feature extraction.
* :mod:`scripts.wsi.gpu_decode` cuCIM decoding into CUDA memory for extraction (``decode_device``).

Why a subclass and not ``monai.data.WSIReader(backend=...)``: MONAI's readers take one backend each, trust
the backend's resolution (cuCIM reports 1.0 um/px for Aperio files whose header says 0.499) and crash the
process on files cuCIM cannot decode. Here ``read`` returns the bundle's ``SlideHandle`` (whatever backend
opened the file) and ``get_mpp`` returns the resolution :mod:`scripts.wsi.mpp` decided from the vendor
metadata or the datalist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from monai.data.wsi_reader import BaseWSIReader
from monai.utils import ensure_tuple
from PIL import Image

from scripts.wsi.backends import DEFAULT_BACKENDS
from scripts.wsi.backends.base import SlideHandle
from scripts.wsi.filekind import file_kind
from scripts.wsi.mpp import MppError
from scripts.wsi.open import open_slide

__all__ = ["SlideWSIReader"]

SLIDE_SUFFIXES = ("svs", "tif", "tiff", "ndpi", "mrxs", "scn", "vms", "vmu", "bif", "svslide", "qptiff", "dcm")


class SlideWSIReader(BaseWSIReader):
    """MONAI WSI reader over the bundle's fallback chain, with the bundle's trusted mpp.

    Args:
        backends: tried in order (cuCIM only after the crash-safe probe accepted the file).
        default_mpp: level-0 um/px for slides without any usable resolution metadata.
        require_mpp: raise ``MppError`` at ``read`` when a slide has no resolution; when False,
            ``get_mpp`` raises only if asked.
        extra_downsamples: coarser levels (downsample factors relative to level 0) added after a slide's own
            levels when they are coarser than its coarsest one; their pixels are read from the finest real
            level not finer than needed and resized (bilinear). For MONAI code that reads a whole
            low-resolution level, e.g. ``MaskedPatchWSIDataset(mask_level=...)`` (one sample per mask pixel),
            on files without a pyramid such as the CMU-1 region.
        level, mpp, mpp_rtol, mpp_atol, power, power_rtol, power_atol, channel_dim, dtype, device, mode:
            as in ``monai.data.wsi_reader.BaseWSIReader`` (``channel_dim`` 0 gives C, H, W like MONAI's
            readers; pass -1 for H, W, C).

    ``read(path, mpp=...)`` takes a per-slide resolution override (the datalist's ``mpp`` column).
    """

    supported_suffixes = list(SLIDE_SUFFIXES)
    backend = "smile"

    def __init__(
        self,
        backends: Sequence[str] = DEFAULT_BACKENDS,
        default_mpp: float | None = None,
        require_mpp: bool = True,
        extra_downsamples: Sequence[float] = (),
        level: int | None = None,
        mpp: float | tuple[float, float] | None = None,
        mpp_rtol: float = 0.05,
        mpp_atol: float = 0.0,
        power: int | None = None,
        power_rtol: float = 0.05,
        power_atol: float = 0.0,
        channel_dim: int = 0,
        dtype=np.uint8,
        device=None,
        mode: str = "RGB",
        **kwargs,
    ) -> None:
        super().__init__(level=level, mpp=mpp, mpp_rtol=mpp_rtol, mpp_atol=mpp_atol, power=power,
                         power_rtol=power_rtol, power_atol=power_atol, channel_dim=channel_dim, dtype=dtype,
                         device=device, mode=mode, **kwargs)
        unknown = [b for b in backends if b not in DEFAULT_BACKENDS]
        if unknown or not backends:
            raise ValueError(f"unknown reader backend(s) {unknown}; choose from {DEFAULT_BACKENDS}")
        self.backends = tuple(backends)
        self.default_mpp = default_mpp
        self.require_mpp = bool(require_mpp)
        self.extra_downsamples = tuple(sorted(float(d) for d in extra_downsamples))
        if any(d <= 1.0 for d in self.extra_downsamples):
            raise ValueError(f"extra_downsamples {list(extra_downsamples)}: each must be larger than 1 (level 0)")

    # ------------------------------------------------------------------------------------- opening
    def verify_suffix(self, filename) -> bool:
        """True for whole-slide file names (by suffix) and for TIFF/DICOM files whatever their name."""
        for name in ensure_tuple(filename):
            suffix = Path(str(name)).suffix.lower().lstrip(".")
            if suffix not in SLIDE_SUFFIXES and file_kind(name) == "other":
                return False
        return True

    def read(self, data, mpp: float | None = None, slide_id: str | None = None, **kwargs):
        """Open one slide (or a sequence of slides) -> ``SlideHandle`` (or a list of them).

        Raises ``SlideReadError`` (every backend failed, each reason listed) or ``MppError``.
        """
        handles = [
            open_slide(path, backends=self.backends, slide_id=slide_id, mpp=mpp, default_mpp=self.default_mpp,
                       require_mpp=self.require_mpp)
            for path in ensure_tuple(data)
        ]
        return handles if len(handles) > 1 else handles[0]

    # ----------------------------------------------------------------------------------- geometry
    def downsamples(self, wsi: SlideHandle) -> list[float]:
        """Every level's downsample: the slide's own, then ``extra_downsamples`` coarser than its coarsest."""
        own = [float(d) for d in wsi.level_downsamples]
        return own + [d for d in self.extra_downsamples if d > own[-1] * 1.001]

    def get_size(self, wsi: SlideHandle, level: int) -> tuple[int, int]:
        """(height, width) of ``level``."""
        level = int(level)
        if level < wsi.level_count:
            width, height = wsi.level_dimensions[level]
            return int(height), int(width)
        downsample = self.downsamples(wsi)[level]
        width, height = wsi.dimensions
        return max(1, int(round(height / downsample))), max(1, int(round(width / downsample)))

    def get_level_count(self, wsi: SlideHandle) -> int:
        return len(self.downsamples(wsi))

    def get_downsample_ratio(self, wsi: SlideHandle, level: int) -> float:
        return self.downsamples(wsi)[int(level)]

    def get_file_path(self, wsi: SlideHandle) -> str:
        return str(os.path.abspath(wsi.path))

    def get_mpp(self, wsi: SlideHandle, level: int) -> tuple[float, float]:
        """(y, x) um/px at ``level``: the bundle's trusted level-0 mpp times the level's downsample."""
        value = None if wsi.mpp is None else wsi.mpp * self.get_downsample_ratio(wsi, level)
        if value is None:
            raise MppError(f"{wsi.path}: no usable resolution (mpp) in its metadata; add an 'mpp' column to the "
                           f"datalist or set default_mpp")
        return float(value), float(value)

    def get_power(self, wsi: SlideHandle, level: int) -> float:
        """Objective power at ``level``, taken as 10 / mpp (the usual 20x = 0.5 um/px convention)."""
        return 10.0 / self.get_mpp(wsi, level)[0]

    # ------------------------------------------------------------------------------------ pixels
    def _get_patch(self, wsi: SlideHandle, location: tuple[int, int], size: tuple[int, int], level: int,
                   dtype, mode: str) -> np.ndarray:
        """``location`` (y, x) at level 0 and ``size`` (h, w) at ``level``, as in MONAI; RGB(A) in ``dtype``
        with the channel axis at ``channel_dim``. Areas outside the slide come back white."""
        xy, (height, width), level = (int(location[1]), int(location[0])), (int(size[0]), int(size[1])), int(level)
        if level < wsi.level_count:
            pixels = wsi.read_region(xy, (width, height), level)
        else:  # an extra level: read the finest real level not finer than needed, resize
            wanted = self.get_downsample_ratio(wsi, level)
            real = max(i for i, d in enumerate(wsi.level_downsamples) if d <= wanted * 1.001)
            scale = wanted / float(wsi.level_downsamples[real])
            region = wsi.read_region(xy, (max(1, round(width * scale)), max(1, round(height * scale))), real)
            pixels = np.asarray(Image.fromarray(region).resize((width, height), Image.BILINEAR))
        if mode == "RGBA":
            pixels = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        pixels = np.moveaxis(pixels, -1, self.channel_dim)
        return np.ascontiguousarray(pixels, dtype=dtype)
