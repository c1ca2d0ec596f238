"""Shared part of the cuCIM and OpenSlide backends: a slide opened through MONAI's ``WSIReader``."""

from __future__ import annotations

import contextlib
import math

import numpy as np
from monai.data import WSIReader

from scripts.utils.quiet import native_output_silenced
from scripts.wsi.backends.base import SlideHandle, to_rgb

_MONAI_READERS: dict[str, object] = {}


@contextlib.contextmanager
def _no_silence():
    yield


class MonaiWSIHandle(SlideHandle):
    """cuCIM or OpenSlide through MONAI's ``WSIReader`` (location (y, x), size (h, w) in MONAI's API)."""

    def __init__(self, path, backend: str):
        super().__init__(path)

        self.backend = backend
        # cuCIM's bundled libtiff and cuFile print notes on fd 2 (no GPU driver, deflate config): hide them
        quiet = native_output_silenced if backend == "cucim" else _no_silence
        with quiet():
            reader = _MONAI_READERS.get(backend)
            if reader is None:
                reader = _MONAI_READERS[backend] = WSIReader(backend=backend, channel_dim=-1, mode="RGB")
            self.reader = reader
            self.raw = reader.read(str(self.path))
        self._quiet = quiet
        n_levels = reader.get_level_count(self.raw)
        for level in range(n_levels):
            height, width = reader.get_size(self.raw, level)
            self.level_dimensions.append((int(width), int(height)))
            self.level_downsamples.append(float(reader.get_downsample_ratio(self.raw, level)))
        self.openslide_properties = dict(self.raw.properties) if backend == "openslide" else None

    def _read(self, location, size, level):
        width, height = size
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        # clip to the slide (backends differ on what they return outside it), pad with white
        lx, ly = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lw), min(ly + height, lh)
        out = np.full((height, width, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        loc0 = (int(round(y0 * ds)), int(round(x0 * ds))) if (x0, y0) != (lx, ly) else (location[1], location[0])
        with self._quiet():
            patch, _ = self.reader.get_data(self.raw, location=loc0, size=(y1 - y0, x1 - x0), level=level)
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = to_rgb(patch)
        return out

    def close(self):
        close = getattr(self.raw, "close", None)
        if close is not None:
            close()
