"""Preview PNG of a preprocessed slide: thumbnail, tissue contour (green), patch grid (blue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from scripts.utils.io_utils import atomic_path


def save_preview(
    path: str | Path,
    thumbnail: np.ndarray,
    mask: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    patch_size_level0: int,
    max_size: int = 1024,
    title: str | None = None,
) -> None:
    """``thumbnail`` and ``mask`` share a grid whose pixel is ``downsample`` level-0 pixels wide."""
    height, width = mask.shape
    factor = min(1.0, max_size / float(max(width, height)))
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    image = Image.fromarray(thumbnail).resize(size, Image.BILINEAR) if factor != 1.0 else Image.fromarray(thumbnail)
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    edge = small & ~_erode(small)
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[edge] = (0, 200, 0)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    scale = factor / downsample  # preview pixels per level-0 pixel
    side = patch_size_level0 * scale
    for x, y in np.asarray(coords).reshape(-1, 2):
        x0, y0 = x * scale, y * scale
        draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(30, 80, 255))
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out
