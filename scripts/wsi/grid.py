"""Pyramid level choice and the tissue patch grid.

A patch is ``patch_size`` pixels at ``target_mpp``; it covers ``patch_size * target_mpp / mpp`` level-0
pixels. It is read at the level closest to the target that is not coarser (so it is only ever
downscaled), as a ``read_size_level`` square, and resized to ``patch_size`` (``scale`` =
patch_size / read_size_level, 1.0 when a level matches the target).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LEVEL_TOLERANCE = 0.02  # a level 2% coarser than the target still counts (Aperio: 2.0005 downsamples)


def choose_level(level_downsamples, mpp: float, target_mpp: float, tolerance: float = LEVEL_TOLERANCE) -> int:
    """Index of the coarsest level whose um/px is at most ``target_mpp`` (within ``tolerance``);
    level 0 when even level 0 is coarser than the target (the patch is then upscaled)."""
    best, best_ds = 0, 0.0
    for index, downsample in enumerate(level_downsamples):
        if mpp * downsample <= target_mpp * (1.0 + tolerance) and downsample > best_ds:
            best, best_ds = index, downsample
    return best


@dataclass
class PatchGrid:
    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    patch_size: int
    target_mpp: float
    mpp: float
    level: int
    level_downsample: float
    read_size_level: int
    patch_size_level0: int
    stride_level0: float
    scale: float
    extra: dict = field(default_factory=dict)

    def attrs(self) -> dict:
        return {
            "patch_size": int(self.patch_size),
            "target_mpp": float(self.target_mpp),
            "mpp": float(self.mpp),
            "level": int(self.level),
            "level_downsample": float(self.level_downsample),
            "read_size_level": int(self.read_size_level),
            "patch_size_level0": int(self.patch_size_level0),
            "stride_level0": float(self.stride_level0),
            "scale": float(self.scale),
        }


def patch_grid(
    dimensions: tuple[int, int],
    level_downsamples,
    mpp: float,
    mask: np.ndarray,
    mask_downsample: float,
    patch_size: int = 256,
    target_mpp: float = 0.5,
    overlap: float = 0.0,
    min_tissue_fraction: float = 0.5,
) -> PatchGrid:
    """Grid of whole patches over the slide, kept where the tissue mask covers enough of the patch.

    Args:
        dimensions: level-0 (width, height).
        mask: boolean tissue mask; mask pixel (i, j) covers level-0 pixels from (j, i) * mask_downsample.
        overlap: fraction of a patch shared by neighbours (0 = edge to edge, 0.5 = half a patch).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap {overlap} must be in [0, 1)")
    level = choose_level(level_downsamples, mpp, target_mpp)
    level_ds = float(level_downsamples[level])
    size0 = patch_size * target_mpp / mpp  # level-0 pixels per patch side
    read_size = max(1, int(round(size0 / level_ds)))
    stride0 = size0 * (1.0 - overlap)
    width, height = dimensions
    xs = np.floor(np.arange(0.0, width - size0 + 1e-6, stride0)).astype(np.int64)
    ys = np.floor(np.arange(0.0, height - size0 + 1e-6, stride0)).astype(np.int64)
    grid = PatchGrid(
        coords=np.zeros((0, 2), np.int64), tissue_fraction=np.zeros(0, np.float32), patch_size=patch_size,
        target_mpp=target_mpp, mpp=mpp, level=level, level_downsample=level_ds, read_size_level=read_size,
        patch_size_level0=int(round(size0)), stride_level0=stride0, scale=patch_size / read_size,
    )
    if len(xs) == 0 or len(ys) == 0:
        return grid
    # tissue fraction of each patch from a summed-area table of the mask
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)

    def span(starts):
        lo = np.clip(np.round(starts / mask_downsample).astype(np.int64), 0, None)
        hi = np.round((starts + size0) / mask_downsample).astype(np.int64)
        hi = np.maximum(hi, lo + 1)
        return lo, hi

    x0, x1 = span(xs.astype(np.float64))
    y0, y1 = span(ys.astype(np.float64))
    x0, x1 = np.clip(x0, 0, mask.shape[1]), np.clip(x1, 0, mask.shape[1])
    y0, y1 = np.clip(y0, 0, mask.shape[0]), np.clip(y1, 0, mask.shape[0])
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    total = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    area = np.maximum((Y1 - Y0) * (X1 - X0), 1)
    fraction = total / area
    keep = fraction >= min_tissue_fraction
    rows, cols = np.nonzero(keep)  # row-major: top-to-bottom, left-to-right
    grid.coords = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64)
    grid.tissue_fraction = fraction[rows, cols].astype(np.float32)
    return grid
