"""Reading patch grids for feature extraction.

:class:`PatchReader` reads a grid of level-0 coordinates in batches: cuCIM's batched, multi-threaded
``read_region`` when the probe accepted the file, else the fallback backend's ``read_region`` in a thread
pool. ``warm_up`` probes a cohort first.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from scripts.wsi.backends import DEFAULT_BACKENDS
from scripts.wsi.backends.base import SlideHandle, SlideReadError, to_rgb
from scripts.wsi.edges import crosses_edge, paint_outside_white
from scripts.wsi.gpu_decode import cucim_cuda_batches
from scripts.wsi.open import _open_first_backend
from scripts.wsi.probe import probe_cucim


def resize_rgb(patch: np.ndarray, out_size: int) -> np.ndarray:
    """Square RGB patch -> (out_size, out_size, 3), bilinear with antialiasing (PIL)."""
    if patch.shape[0] == out_size and patch.shape[1] == out_size:
        return patch

    return np.asarray(Image.fromarray(patch).resize((out_size, out_size), Image.BILINEAR))


class PatchReader:
    """A slide opened for reading patch grids (feature extraction); ``backend`` names the reader in use.

    cuCIM (only after the crash-safe probe said yes) reads each batch with its batched, multi-threaded
    ``read_region``; any other backend reads one patch per call, ``num_workers`` patches at a time in a
    thread pool (OpenSlide and imagecodecs release the GIL while decoding).
    """

    def __init__(
        self,
        slide_path: str | os.PathLike | None = None,
        backends: Sequence[str] = DEFAULT_BACKENDS,
        slide_id: str | None = None,
        cucim_verdict: tuple[bool, str] | None = None,
        handle: SlideHandle | None = None,
    ):
        if handle is not None:  # a slide already opened (e.g. by SlideWSIReader in OpenSlided)
            self.path, self.handle = Path(handle.path), handle
        else:
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
        decode_device: str = "cpu",
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(patches (B, out_size, out_size, 3) uint8, coords (B, 2))`` in the order of ``coords``.

        ``decode_device="cuda"`` (resolved by :func:`scripts.wsi.gpu_decode.resolve_decode_device`) makes
        cuCIM decode on the GPU and yields CUDA tensors instead of arrays (:mod:`scripts.wsi.gpu_decode`;
        not yet run on a GPU); other backends decode on the CPU whatever it says.

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
        if self.backend == "cucim" and decode_device == "cuda":
            yield from cucim_cuda_batches(self.handle.raw, coords, size, level, int(out_size), batch_size, num_workers,
                                          self.handle.level_downsamples[level], self.handle.level_dimensions[level])
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
            for i, (patch, xy) in enumerate(zip(array, chunk)):
                patch = to_rgb(patch)
                if crosses_edge(xy, size, downsample, (level_w, level_h)):  # cuCIM pads with black
                    patch = paint_outside_white(patch.copy(), xy, size, downsample, (level_w, level_h))
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
    slide_path: str | os.PathLike, *args, backends: Sequence[str] = DEFAULT_BACKENDS, **kwargs
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``PatchReader(slide_path, backends).batches(*args, **kwargs)`` (same arguments as
    :meth:`PatchReader.batches`): open, read the grid in ``coords`` order, close."""
    with PatchReader(slide_path, backends) as reader:
        yield from reader.batches(*args, **kwargs)


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
