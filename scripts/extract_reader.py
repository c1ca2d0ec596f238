"""Batched patch reading for feature extraction (minimal; the bundle's general slide reader may replace it).

``read_patches(slide_path, coords, level, read_size, out_size, batch_size, num_workers)`` yields uint8
arrays (B, out_size, out_size, 3) in the order of ``coords`` (level-0 top-left x, y). Regions of
``read_size`` pixels are read at pyramid ``level`` and resized to ``out_size`` when the two differ.

Backends, tried in this order (``backend="auto"``):
  * cuCIM: ``CuImage.read_region(locations, size, level, num_workers=, batch_size=)``, its C++ thread pool
    reads and decodes a batch at once. Skipped for TIFFs compressed with deflate + predictor, which make
    cuCIM 26.10 crash the whole process.
  * OpenSlide (SVS, NDPI, MRXS, generic tiled TIFF).
  * tifffile: decodes only the tiles a patch touches (any TIFF tifffile reads, incl. SubIFD pyramids).
A backend is used only if it opens the file and has the requested level.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from scripts.quiet import native_stderr_silenced

logger = logging.getLogger(__name__)

BACKENDS = ("cucim", "openslide", "tifffile")


class SlideReadError(RuntimeError):
    """A slide that no backend can read at the requested level; the message lists each backend's reason."""


def read_patches(
    slide_path: str | Path,
    coords: np.ndarray,
    level: int,
    read_size: int,
    out_size: int,
    batch_size: int = 32,
    num_workers: int = 2,
    backend: str = "auto",
) -> Iterator[np.ndarray]:
    """Yield uint8 (B, out_size, out_size, 3) batches of the patches at ``coords`` (level-0 x, y), in order."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    reader = open_patch_reader(slide_path, level, backend=backend)
    try:
        for batch in reader.read_batches(coords, level, int(read_size), int(batch_size), int(num_workers)):
            yield resize_batch(batch, int(out_size))
    finally:
        reader.close()


def resize_batch(batch: np.ndarray, out_size: int) -> np.ndarray:
    """Resize a uint8 (B, H, W, 3) batch to out_size (antialiased bilinear); unchanged when already that size."""
    if batch.shape[1] == out_size and batch.shape[2] == out_size:
        return batch
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def open_patch_reader(slide_path: str | Path, level: int, backend: str = "auto"):
    """The first backend that opens ``slide_path`` and has ``level``; SlideReadError lists every failure."""
    path = Path(slide_path)
    if not path.is_file():
        raise SlideReadError(f"slide {path} does not exist")
    order = BACKENDS if backend == "auto" else (backend,)
    unknown = [b for b in order if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown reader backend {unknown[0]!r}; choose auto or one of {BACKENDS}")
    reasons = []
    for name in order:
        try:
            reader = _OPENERS[name](path)
        except Exception as exc:  # noqa: BLE001 - collected into one message
            reasons.append(f"{name}: {type(exc).__name__}: {exc}".strip())
            continue
        if level < reader.level_count:
            return reader
        reasons.append(f"{name}: has {reader.level_count} level(s), level {level} requested")
        reader.close()
    raise SlideReadError(f"cannot read {path} at level {level}: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------------- cuCIM
_cucim_first_open = True


@contextlib.contextmanager
def _stdout_silenced():
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def warm_up(slide_path: str | Path, level: int = 0, backend: str = "auto") -> None:
    """Open (and close) a slide once, so the first cuCIM open, whose native messages are hidden by briefly
    redirecting stdout/stderr, happens in the calling thread before progress bars and reader threads start."""
    with contextlib.suppress(Exception):
        open_patch_reader(slide_path, level, backend=backend).close()


def _tiff_crashes_cucim(path: Path) -> str | None:
    """cuCIM 26.10 segfaults on deflate-with-predictor TIFFs; say why a file is not handed to it."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            for page in tif.pages[:8]:
                compression = int(getattr(page, "compression", 1))
                predictor = int(getattr(page, "predictor", 1))
                if compression in (8, 32946) and predictor != 1:
                    return "deflate + predictor TIFF (cuCIM 26.10 crashes on it)"
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: let cuCIM judge
        return None
    return None


class _CucimReader:
    name = "cucim"

    def __init__(self, path: Path):
        global _cucim_first_open
        reason = _tiff_crashes_cucim(path)
        if reason:
            raise SlideReadError(reason)
        if _cucim_first_open:
            # cuCIM prints libcuda / cuFile probe lines on its first open, on fd 2 or (when MONAI was
            # imported first) on fd 1: hide both for that one call
            with _stdout_silenced(), native_stderr_silenced("cuCIM opened (GPU-less probe messages hidden)"):
                from cucim import CuImage

                self.image = CuImage(str(path))
            _cucim_first_open = False
        else:
            from cucim import CuImage

            self.image = CuImage(str(path))
        self.level_count = int(self.image.resolutions["level_count"])

    def read_batches(self, coords, level, read_size, batch_size, num_workers) -> Iterator[np.ndarray]:
        if len(coords) == 0:
            return
        locations = [(int(x), int(y)) for x, y in coords]
        batch_size = max(1, batch_size)
        if batch_size == 1 or len(locations) == 1:
            for loc in locations:
                yield _rgb(np.array(self.image.read_region(loc, (read_size, read_size), level), copy=True))[None]
            return
        result = self.image.read_region(
            locations, (read_size, read_size), level,
            num_workers=max(1, num_workers), batch_size=batch_size, drop_last=False,
        )
        for batch in result:
            # copy while the batch object is alive: np.asarray is a view into a buffer cuCIM frees or reuses
            # once the iterator moves on (seen as corrupted first pixels of every batch but the last)
            array = np.array(batch, copy=True)
            if array.ndim == 3:  # a single patch comes back without the batch axis
                array = array[None]
            yield _rgb(array)

    def close(self):
        close = getattr(self.image, "close", None)
        if close:
            close()


# ----------------------------------------------------------------------------------------- OpenSlide
class _OpenSlideReader:
    name = "openslide"

    def __init__(self, path: Path):
        import openslide

        with native_stderr_silenced():  # libtiff prints directory-order warnings on fd 2
            self.slide = openslide.OpenSlide(str(path))
        self.level_count = self.slide.level_count
        self._lock = threading.Lock()

    def _read(self, loc, level, size):
        region = self.slide.read_region(loc, level, (size, size))  # RGBA, premultiplied
        return np.asarray(region)[..., :3]

    def read_batches(self, coords, level, read_size, batch_size, num_workers) -> Iterator[np.ndarray]:
        locations = [(int(x), int(y)) for x, y in coords]
        batches = [locations[i:i + max(1, batch_size)] for i in range(0, len(locations), max(1, batch_size))]
        with ThreadPoolExecutor(max(1, num_workers)) as pool:  # OpenSlide's C reads release the GIL
            for chunk in batches:
                yield np.stack(list(pool.map(lambda loc: self._read(loc, level, read_size), chunk)))

    def close(self):
        self.slide.close()


# ------------------------------------------------------------------------------------------ tifffile
class _TiffReader:
    """Reads only the tiles a patch touches, from the pyramid level tifffile finds (pages or SubIFDs)."""

    name = "tifffile"

    def __init__(self, path: Path):
        import tifffile

        self.tif = tifffile.TiffFile(path)
        try:
            series = self.tif.series[0]
            self.pages = [lvl.keyframe for lvl in series.levels]
        except Exception:
            self.tif.close()
            raise
        if not self.pages or self.pages[0].ndim < 2:
            self.tif.close()
            raise SlideReadError("no image series in the TIFF")
        self.level_count = len(self.pages)
        self._file_lock = threading.Lock()
        self._whole: dict[int, np.ndarray] = {}

    def _level_array(self, level):  # untiled (striped) level: decode it whole once
        if level not in self._whole:
            self._whole[level] = _rgb(self.pages[level].asarray())
        return self._whole[level]

    def _read(self, x0, y0, level, size) -> np.ndarray:
        page = self.pages[level]
        height, width = page.shape[:2]
        base_h, base_w = self.pages[0].shape[:2]
        ds_x, ds_y = base_w / width, base_h / height
        x, y = int(math.floor(x0 / ds_x)), int(math.floor(y0 / ds_y))
        out = np.zeros((size, size, 3), np.uint8)
        x_lo, y_lo, x_hi, y_hi = max(x, 0), max(y, 0), min(x + size, width), min(y + size, height)
        if x_lo >= x_hi or y_lo >= y_hi:
            return out
        if not page.is_tiled:
            out[y_lo - y:y_hi - y, x_lo - x:x_hi - x] = self._level_array(level)[y_lo:y_hi, x_lo:x_hi]
            return out
        tw, th = page.tilewidth, page.tilelength
        across = -(-width // tw)
        decode = page.decode
        for ty in range(y_lo // th, (y_hi - 1) // th + 1):
            for tx in range(x_lo // tw, (x_hi - 1) // tw + 1):
                index = ty * across + tx
                with self._file_lock:
                    self.tif.filehandle.seek(page.dataoffsets[index])
                    data = self.tif.filehandle.read(page.databytecounts[index])
                tile, _, _ = decode(data, index, jpegtables=page.jpegtables)
                tile = _rgb(np.asarray(tile).reshape(th, tw, -1))
                ox, oy = tx * tw, ty * th
                sx0, sy0 = max(x_lo, ox), max(y_lo, oy)
                sx1, sy1 = min(x_hi, ox + tw), min(y_hi, oy + th)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
        return out

    def read_batches(self, coords, level, read_size, batch_size, num_workers) -> Iterator[np.ndarray]:
        locations = [(int(x), int(y)) for x, y in coords]
        step = max(1, batch_size)
        with ThreadPoolExecutor(max(1, num_workers)) as pool:  # imagecodecs releases the GIL while decoding
            for i in range(0, len(locations), step):
                chunk = locations[i:i + step]
                yield np.stack(list(pool.map(lambda loc: self._read(loc[0], loc[1], level, read_size), chunk)))

    def close(self):
        self.tif.close()


def _rgb(array: np.ndarray) -> np.ndarray:
    """(..., H, W, C) -> uint8 RGB: drop alpha, repeat grey."""
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] > 3:
        array = array[..., :3]
    if array.dtype != np.uint8:
        raise SlideReadError(f"expected 8-bit RGB pixels, got {array.dtype}")
    return array


_OPENERS = {"cucim": _CucimReader, "openslide": _OpenSlideReader, "tifffile": _TiffReader}


def backend_name(reader) -> str:
    return reader.name


__all__: Sequence[str] = ("read_patches", "open_patch_reader", "resize_batch", "SlideReadError", "BACKENDS")
