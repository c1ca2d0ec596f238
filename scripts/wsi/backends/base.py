"""What every backend gives: :class:`SlideHandle` (level geometry, trusted mpp, RGB region reads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.utils.errors import BundleError


class SlideReadError(BundleError, RuntimeError):
    """No backend could read a slide; the message lists each backend's reason."""


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


def _hwc(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        return array[..., None]
    return array
