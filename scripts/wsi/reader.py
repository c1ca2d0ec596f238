"""Open a whole-slide image with backend fallback, behind a crash-safe cuCIM probe.

Backends, tried in order (``DEFAULT_BACKENDS``):

``cucim``     MONAI ``WSIReader(backend="cucim")`` - only after a child process has opened the file
              with cuCIM and survived (cuCIM 26.10 segfaults on some TIFFs, e.g. deflate + predictor).
``openslide`` MONAI ``WSIReader(backend="openslide")`` (openslide-python + openslide-bin).
``tifffile``  tile-by-tile region reading with tifffile (any TIFF pyramid, any codec imagecodecs has).
``dicom``     DICOM whole-slide images (TILED_FULL) frame by frame with pydicom: OpenSlide 4 rejects
              some files ("Couldn't get image flavor").

Every backend returns RGB uint8 (an alpha channel is dropped). ``SlideHandle`` exposes the level
geometry, ``mpp`` with ``mpp_source`` (from ``scripts.wsi.mpp``, never a backend's default), and
``read_region(location_level0_xy, size_wh, level)``. ``PatchReader`` (and ``iter_patch_batches``) reads
a patch grid for feature extraction: cuCIM's batched, multi-threaded ``read_region`` when cuCIM can read
the file, else the fallback backend's ``read_region`` in a thread pool; ``warm_up`` probes a cohort first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from scripts.errors import BundleError
from scripts.quiet import native_output_silenced
from scripts.wsi import mpp as mpp_lib

logger = logging.getLogger(__name__)

DEFAULT_BACKENDS = ("cucim", "openslide", "tifffile", "dicom")
_PROBE_SCRIPT = Path(__file__).with_name("_cucim_probe.py")
_PROBE_CACHE: dict[tuple, tuple[bool, str]] = {}


class SlideReadError(BundleError, RuntimeError):
    """No backend could read a slide; the message lists each backend's reason."""


# ----------------------------------------------------------------------------------------------------
# crash-safe cuCIM probe
# ----------------------------------------------------------------------------------------------------


def _cache_key(path) -> tuple:
    path = Path(path).resolve()
    try:
        stat = path.stat()
        return (str(path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return (str(path), -1, -1)


def probe_cucim(paths: Sequence[str | os.PathLike], timeout_per_file: float = 30.0) -> dict[str, tuple[bool, str]]:
    """Ask a child process whether cuCIM can open and decode each file; cached per file for this process.

    Returns ``{str(path): (ok, message)}``. One child process handles many files; when cuCIM kills it
    (segfault), that file is marked and a fresh child carries on with the rest.
    """
    result: dict[str, tuple[bool, str]] = {}
    todo: list[str] = []
    for path in paths:
        key = _cache_key(path)
        if key in _PROBE_CACHE:
            result[str(path)] = _PROBE_CACHE[key]
        elif not Path(path).is_file():
            result[str(path)] = (False, "file does not exist")
        elif mpp_lib.file_kind(path) == "dicom":
            result[str(path)] = (False, "DICOM files are not read with cuCIM here")
        else:
            todo.append(str(path))
    while todo:
        verdicts = _run_probe(todo, timeout_per_file)
        for index, path in enumerate(todo[: len(verdicts)]):
            result[path] = _PROBE_CACHE[_cache_key(path)] = verdicts[index]
        todo = todo[len(verdicts):]
    return result


def _run_probe(paths: list[str], timeout_per_file: float) -> list[tuple[bool, str]]:
    """Probe ``paths`` in order until the child dies; returns verdicts for a non-empty prefix."""
    cmd = [sys.executable, str(_PROBE_SCRIPT), *paths]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10.0 + timeout_per_file * len(paths))
        stdout, returncode, timed_out = proc.stdout, proc.returncode, False
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        returncode, timed_out = None, True
    verdicts: dict[int, tuple[bool, str]] = {}
    started = -1
    for line in stdout.splitlines():
        parts = line.split("\t", 2)
        if parts[0] == "START":
            started = int(parts[1])
        elif parts[0] == "OK":
            verdicts[int(parts[1])] = (True, f"cuCIM ok ({parts[2]} channels)")
        elif parts[0] == "ERR":
            verdicts[int(parts[1])] = (False, f"cuCIM cannot read it: {parts[2]}")
    done = 0
    while done in verdicts:
        done += 1
    if done < len(paths):
        if timed_out:
            why = "cuCIM timed out opening it"
        elif returncode is not None and returncode < 0:
            why = f"cuCIM crashed the probe process (signal {-returncode})"
        else:
            why = f"cuCIM probe process exited with code {returncode}"
        verdicts[done] = (False, why)
        done += 1
    return [verdicts[i] for i in range(done)]


# ----------------------------------------------------------------------------------------------------
# slide handles
# ----------------------------------------------------------------------------------------------------


class SlideHandle:
    """An open slide: level geometry, resolution with its source, RGB region reads."""

    backend = "base"
    parallel_reads = True  # read_region may be called from several threads at once

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.level_dimensions: list[tuple[int, int]] = []  # (width, height) per level
        self.level_downsamples: list[float] = []
        self.mpp: float | None = None
        self.mpp_source: str | None = None
        self.notes: list[str] = []  # e.g. why an earlier backend was skipped

    # subclasses implement _read(location_level0_xy, size_wh, level) -> (h, w, C) uint8
    def _read(self, location: tuple[int, int], size: tuple[int, int], level: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def read_region(self, location: tuple[int, int], size: tuple[int, int], level: int = 0) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``size`` = (width, height) level pixels whose top-left is
        ``location`` = (x, y) in level-0 pixels. Areas outside the slide come back white."""
        width, height = int(size[0]), int(size[1])
        if not 0 <= int(level) < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist ({self.backend} sees {self.level_count} level(s))")
        pixels = self._read((int(location[0]), int(location[1])), (width, height), int(level))
        return to_rgb(pixels)

    def read_scaled(self, downsample: float, max_chunk: int = 2048) -> np.ndarray:
        """The whole slide at ``downsample`` (relative to level 0), RGB uint8, read in chunks from the
        finest level that is not finer than needed, so memory stays bounded on large levels."""
        from PIL import Image

        level = max((i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001), default=0)
        level_ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        out_w = max(1, int(round(self.dimensions[0] / downsample)))
        out_h = max(1, int(round(self.dimensions[1] / downsample)))
        scale = level_ds / downsample  # output pixels per level pixel
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        for y in range(0, level_h, max_chunk):
            for x in range(0, level_w, max_chunk):
                w, h = min(max_chunk, level_w - x), min(max_chunk, level_h - y)
                chunk = self.read_region((int(round(x * level_ds)), int(round(y * level_ds))), (w, h), level)
                x0, y0 = int(round(x * scale)), int(round(y * scale))
                x1, y1 = min(out_w, int(round((x + w) * scale))), min(out_h, int(round((y + h) * scale)))
                if x1 <= x0 or y1 <= y0:
                    continue
                if (x1 - x0, y1 - y0) != (w, h):
                    chunk = np.asarray(Image.fromarray(chunk).resize((x1 - x0, y1 - y0), Image.BILINEAR))
                out[y0:y1, x0:x1] = chunk[: y1 - y0, : x1 - x0]
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size``."""
        downsample = max(1.0, max(self.dimensions) / float(max_size))
        return self.read_scaled(downsample)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "level_dimensions": self.level_dimensions,
            "level_downsamples": self.level_downsamples,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "notes": self.notes,
        }


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(h, w, C) -> (h, w, 3) uint8: drop alpha (transparent -> white), expand grey."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    channels = pixels.shape[-1]
    if channels == 4:
        alpha = pixels[..., 3:4]
        if alpha.min() < 255:  # OpenSlide marks outside-of-slide pixels transparent
            rgb = pixels[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))
            return (rgb // 255).astype(np.uint8)
        return np.ascontiguousarray(pixels[..., :3])
    if channels == 1:
        return np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


_MONAI_READERS: dict[str, object] = {}


@contextlib.contextmanager
def _no_silence():
    yield


class MonaiWSIHandle(SlideHandle):
    """cuCIM or OpenSlide through MONAI's ``WSIReader`` (location (y, x), size (h, w) in MONAI's API)."""

    def __init__(self, path, backend: str):
        super().__init__(path)
        from monai.data import WSIReader

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


class TiffFileHandle(SlideHandle):
    """Any TIFF pyramid via tifffile, decoding only the tiles a region touches."""

    backend = "tifffile"

    def __init__(self, path):
        super().__init__(path)
        import tifffile

        self.tif = tifffile.TiffFile(str(self.path))
        series = self.tif.series[0]
        self.pages = []
        for level in series.levels:
            page = level.keyframe if hasattr(level, "keyframe") else level.pages[0]
            self.pages.append(page)
        base_h, base_w = self.pages[0].imagelength, self.pages[0].imagewidth
        for page in self.pages:
            self.level_dimensions.append((int(page.imagewidth), int(page.imagelength)))
            self.level_downsamples.append(float(base_w) / page.imagewidth if page.imagewidth else 1.0)
        self._whole: dict[int, np.ndarray] = {}
        self._file_lock = threading.Lock()  # seek + read of one tile at a time; decoding runs in parallel
        del base_h

    def _read(self, location, size, level):
        page = self.pages[level]
        width, height = size
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        lw, lh = self.level_dimensions[level]
        out = np.full((height, width, page.samplesperpixel if page.samplesperpixel in (1, 3, 4) else 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, lw), min(ly + height, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        if not page.is_tiled:
            whole = self._whole.get(level)
            if whole is None:
                if page.imagewidth * page.imagelength > 2**28:
                    raise SlideReadError(f"{self.path}: striped (untiled) TIFF level of {page.imagewidth}x{page.imagelength} px is too large to read whole")
                whole = self._whole[level] = _hwc(page.asarray())
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = whole[y0:y1, x0:x1, : out.shape[-1]]
            return out
        tw, th = page.tilewidth, page.tilelength
        tiles_across = -(-lw // tw)
        fh = self.tif.filehandle
        decode = page.decode
        jpegtables = page.jpegtables
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * tiles_across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if not count:
                    continue
                with self._file_lock:
                    fh.seek(offset)
                    data = fh.read(count)
                tile, _, _ = decode(data, index, jpegtables=jpegtables)
                tile = _hwc(np.asarray(tile).reshape(tile.shape[-3:]) if tile.ndim > 3 else tile)
                # the tile's place in the level and its overlap with the request
                gx0, gy0 = tx * tw, ty * th
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + tw, lw), min(y1, gy0 + th, lh)
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0, : out.shape[-1]]
        return out

    def close(self):
        self.tif.close()


def _hwc(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        return array[..., None]
    return array


class DicomHandle(SlideHandle):
    """A single-file DICOM whole-slide image (TILED_FULL frames, one resolution), frames decoded on demand."""

    backend = "dicom"
    parallel_reads = False  # frames are decoded into a shared cache

    def __init__(self, path):
        super().__init__(path)
        import pydicom

        self.ds = pydicom.dcmread(str(self.path))
        if "TotalPixelMatrixColumns" not in self.ds:
            raise SlideReadError(f"{self.path}: DICOM file without TotalPixelMatrixColumns is not a tiled whole-slide image")
        organisation = self.ds.get("DimensionOrganizationType", "TILED_FULL") or "TILED_FULL"
        if organisation != "TILED_FULL" or self.ds.get("PerFrameFunctionalGroupsSequence"):
            raise SlideReadError(f"{self.path}: DICOM {organisation} frame layout with per-frame positions is not supported")
        self.width, self.height = int(self.ds.TotalPixelMatrixColumns), int(self.ds.TotalPixelMatrixRows)
        self.tile_w, self.tile_h = int(self.ds.Columns), int(self.ds.Rows)
        self.tiles_across = -(-self.width // self.tile_w)
        self.n_frames = int(self.ds.get("NumberOfFrames", 1))
        if self.n_frames < self.tiles_across * -(-self.height // self.tile_h):
            raise SlideReadError(f"{self.path}: DICOM holds {self.n_frames} frames, fewer than its pixel matrix needs")
        self.level_dimensions = [(self.width, self.height)]
        self.level_downsamples = [1.0]
        self._frames: dict[int, np.ndarray] = {}
        self._encapsulated = self.ds.file_meta.TransferSyntaxUID.is_compressed
        if self._encapsulated:
            from pydicom.encaps import generate_frames

            self._frame_bytes = list(generate_frames(self.ds.PixelData, number_of_frames=self.n_frames))

    def _frame(self, index: int) -> np.ndarray:
        frame = self._frames.get(index)
        if frame is None:
            if self._encapsulated and self.ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.90"):
                from PIL import Image  # JPEG / JPEG 2000: PIL follows the codestream's own colour space

                frame = np.asarray(Image.open(io.BytesIO(self._frame_bytes[index])).convert("RGB"))
            else:
                from pydicom.pixels import pixel_array

                frame = _hwc(pixel_array(self.ds, index=index))
            if len(self._frames) > 256:
                self._frames.clear()
            self._frames[index] = frame
        return frame

    def _read(self, location, size, level):
        width, height = size
        lx, ly = location
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, self.width), min(ly + height, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                tile = to_rgb(self._frame(ty * self.tiles_across + tx))
                gx0, gy0 = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + self.tile_w), min(y1, gy0 + self.tile_h)
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]
        return out


# ----------------------------------------------------------------------------------------------------
# opening with fallback
# ----------------------------------------------------------------------------------------------------


def _open_backend(path: Path, backend: str) -> SlideHandle:
    if backend in ("cucim", "openslide"):
        return MonaiWSIHandle(path, backend)
    if backend == "tifffile":
        return TiffFileHandle(path)
    if backend == "dicom":
        return DicomHandle(path)
    raise ValueError(f"unknown backend {backend!r}; choose from {DEFAULT_BACKENDS}")


def _open_first_backend(
    path: Path, backends: Sequence[str], slide_id: str, cucim_verdict: tuple[bool, str] | None = None
) -> SlideHandle:
    """The first backend in ``backends`` that opens ``path`` and decodes a few pixels (no mpp lookup);
    ``handle.notes`` says why earlier backends were passed over."""
    if not path.is_file():
        raise SlideReadError(f"slide {slide_id!r}: file {path} does not exist; fix the datalist path")
    kind = mpp_lib.file_kind(path)
    reasons: list[str] = []
    handle: SlideHandle | None = None
    for backend in backends:
        if backend == "cucim":
            verdict = cucim_verdict or probe_cucim([path])[str(path)]
            if not verdict[0]:
                reasons.append(f"cucim: {verdict[1]}")
                continue
        if backend == "tifffile" and kind != "tiff":
            reasons.append("tifffile: not a TIFF file")
            continue
        if backend == "dicom" and kind != "dicom":
            continue
        try:
            candidate = _open_backend(path, backend)
            # decode a few pixels at the coarsest level so codec problems show up here, not later
            last = candidate.level_count - 1
            candidate.read_region((0, 0), (4, 4), last)
            handle = candidate
            break
        except Exception as error:  # noqa: BLE001 - any failure moves on to the next backend
            reasons.append(f"{backend}: {' '.join(str(error).split())[:300] or type(error).__name__}")
    if handle is None:
        raise SlideReadError(
            f"slide {slide_id!r}: no reader could open {path} ({'; '.join(reasons)}). Check that the file is a "
            f"complete whole-slide image (TIFF/SVS/NDPI/MRXS/DICOM); re-copy it if it was truncated."
        )
    handle.notes.extend(reasons)
    return handle


def open_slide(
    path: str | os.PathLike,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    slide_id: str | None = None,
    mpp: float | None = None,
    default_mpp: float | None = None,
    require_mpp: bool = True,
    cucim_verdict: tuple[bool, str] | None = None,
) -> SlideHandle:
    """Open ``path`` with the first backend that can read it, and resolve its level-0 mpp.

    Args:
        backends: tried in order; cuCIM only after the crash-safe probe said yes.
        slide_id: used in error messages (defaults to the file name).
        mpp: a user-given value (datalist ``mpp`` column) that overrides the metadata.
        default_mpp: used only when neither ``mpp`` nor the metadata has a plausible value.
        require_mpp: raise ``MppError`` when no resolution is found (else ``handle.mpp`` stays None).
        cucim_verdict: a probe verdict already obtained (e.g. by the parent of a worker pool).

    Raises:
        SlideReadError: every backend failed (each one's reason is listed).
        mpp.MppError: no usable resolution and ``require_mpp``.
    """
    path = Path(path)
    slide_id = slide_id or path.stem
    handle = _open_first_backend(path, backends, slide_id, cucim_verdict)
    try:
        candidates = mpp_lib.collect_candidates(path, getattr(handle, "openslide_properties", None))
        try:
            handle.mpp, handle.mpp_source = mpp_lib.resolve_mpp(slide_id, path, candidates, mpp, default_mpp)
        except mpp_lib.MppError:
            if require_mpp:
                raise
    except Exception:
        handle.close()
        raise
    return handle


# ----------------------------------------------------------------------------------------------------
# reading a patch grid (feature extraction)
# ----------------------------------------------------------------------------------------------------


def resize_rgb(patch: np.ndarray, out_size: int) -> np.ndarray:
    """Square RGB patch -> (out_size, out_size, 3), bilinear with antialiasing (PIL)."""
    if patch.shape[0] == out_size and patch.shape[1] == out_size:
        return patch
    from PIL import Image

    return np.asarray(Image.fromarray(patch).resize((out_size, out_size), Image.BILINEAR))


class PatchReader:
    """A slide opened for reading patch grids (feature extraction); ``backend`` names the reader in use.

    cuCIM (only after the crash-safe probe said yes) reads each batch with its batched, multi-threaded
    ``read_region``; any other backend reads one patch per call, ``num_workers`` patches at a time in a
    thread pool (OpenSlide and imagecodecs release the GIL while decoding).
    """

    def __init__(
        self,
        slide_path: str | os.PathLike,
        backends: Sequence[str] = DEFAULT_BACKENDS,
        slide_id: str | None = None,
        cucim_verdict: tuple[bool, str] | None = None,
    ):
        self.path = Path(slide_path)
        unknown = [b for b in backends if b not in DEFAULT_BACKENDS]
        if unknown or not backends:
            raise ValueError(f"unknown reader backend(s) {list(unknown)}; choose from {DEFAULT_BACKENDS}")
        self.handle = _open_first_backend(self.path, backends, slide_id or self.path.stem, cucim_verdict)
        self.backend = self.handle.backend

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    def batches(
        self,
        coords: np.ndarray,
        read_size_level: int,
        level: int,
        out_size: int = 256,
        batch_size: int = 64,
        num_workers: int = 2,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(patches (B, out_size, out_size, 3) uint8, coords (B, 2))`` in the order of ``coords``.

        Each patch is the ``read_size_level`` x ``read_size_level`` region at ``level`` whose level-0
        top-left is ``coords[i]`` = (x, y), resized to ``out_size``. Every yielded array is freshly
        allocated (never a view into a backend's buffer). Regions past the slide edge come back white.
        """
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        level, size, batch_size = int(level), int(read_size_level), max(1, int(batch_size))
        if not 0 <= level < self.level_count:
            raise SlideReadError(
                f"{self.path}: level {level} requested but {self.backend} sees {self.level_count} level(s); "
                f"re-run preprocessing for this slide so its patch file matches the slide")
        if size < 1:
            raise ValueError(f"{self.path}: region size to read is {size} px")
        if len(coords) == 0:
            return
        if self.backend == "cucim":
            yield from self._cucim_batches(coords, size, level, int(out_size), batch_size, num_workers)
            return
        workers = max(1, int(num_workers)) if getattr(self.handle, "parallel_reads", True) else 1

        def read(xy):
            return resize_rgb(self.handle.read_region((int(xy[0]), int(xy[1])), (size, size), level), int(out_size))

        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(coords), batch_size):
                chunk = coords[start : start + batch_size]
                yield np.stack(list(pool.map(read, chunk))), chunk

    def _cucim_batches(self, coords, size, level, out_size, batch_size, num_workers):
        image = self.handle.raw  # the CuImage MONAI opened
        level_w, level_h = self.handle.level_dimensions[level]
        downsample = self.handle.level_downsamples[level]
        locations = [(int(x), int(y)) for x, y in coords]
        results = image.read_region(
            locations, (size, size), level, num_workers=max(1, int(num_workers)), batch_size=batch_size, drop_last=False
        )
        if not hasattr(results, "__next__") and not isinstance(results, (list, tuple)):
            results = [results]  # a single location may come back as one image, not an iterator
        start = 0
        for batch in results:
            # np.asarray is a view into a buffer cuCIM frees or reuses once the iterator advances (seen as
            # corrupted pixels in every batch but the last): copy every patch into ``out`` before that
            array = np.asarray(batch)
            if array.ndim == 3:  # a batch of one comes back without the batch axis
                array = array[None]
            chunk = coords[start : start + len(array)]
            out = np.empty((len(array), out_size, out_size, 3), np.uint8)
            for i, (patch, (x, y)) in enumerate(zip(array, chunk)):
                patch = to_rgb(patch)
                lx, ly = int(math.floor(x / downsample)), int(math.floor(y / downsample))
                if lx + size > level_w or ly + size > level_h or lx < 0 or ly < 0:  # cuCIM pads with black
                    patch = patch.copy()
                    patch[max(0, level_h - ly) :, :] = 255
                    patch[:, max(0, level_w - lx) :] = 255
                    patch[: max(0, -ly), :] = 255
                    patch[:, : max(0, -lx)] = 255
                out[i] = resize_rgb(patch, out_size)
            del array, batch
            start += len(out)
            yield out, chunk
        if start != len(coords):
            raise SlideReadError(f"{self.path}: cuCIM returned {start} of {len(coords)} patches")

    def close(self) -> None:
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def iter_patch_batches(
    slide_path: str | os.PathLike,
    coords: np.ndarray,
    read_size_level: int,
    level: int,
    out_size: int = 256,
    batch_size: int = 64,
    num_workers: int = 2,
    backends: Sequence[str] = DEFAULT_BACKENDS,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``PatchReader(slide_path, backends).batches(...)``: open, read the grid in ``coords`` order, close."""
    with PatchReader(slide_path, backends) as reader:
        yield from reader.batches(coords, read_size_level, level, out_size, batch_size, num_workers)


def warm_up(slide_paths: Sequence[str | os.PathLike], backends: Sequence[str] = DEFAULT_BACKENDS) -> None:
    """Probe every slide with cuCIM in one child process, then open the first readable one here.

    Call it in the main thread before reader threads and progress bars start: the probe verdicts are
    cached for this process (no child process per slide later), and cuCIM's first in-process open, whose
    native messages are hidden by pointing fds 1 and 2 at /dev/null, happens while nothing else prints.
    """
    paths = [Path(p) for p in slide_paths]
    if "cucim" not in backends or not paths:
        return
    verdicts = probe_cucim(paths)
    for path in paths:
        if verdicts.get(str(path), (False, ""))[0]:
            with contextlib.suppress(Exception):
                PatchReader(path, ("cucim",), cucim_verdict=verdicts[str(path)]).close()
            return
