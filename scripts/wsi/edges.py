"""Patches that run past the edge of the level they are read from.

Readers pad such regions differently (cuCIM with black, OpenSlide with transparent pixels); the bundle
paints them white, like the slide background, on the CPU path (:mod:`scripts.wsi.patches`) and the GPU path
(:mod:`scripts.wsi.gpu_decode`) alike.
"""

from __future__ import annotations

import math


def crosses_edge(xy, size: int, downsample: float, level_size: tuple[int, int]) -> bool:
    """True when the (size x size) region at level-0 ``xy`` = (x, y) runs past the read level's edge."""
    lx, ly = int(math.floor(xy[0] / downsample)), int(math.floor(xy[1] / downsample))
    return lx < 0 or ly < 0 or lx + size > level_size[0] or ly + size > level_size[1]


def paint_outside_white(patch, xy, size: int, downsample: float, level_size: tuple[int, int]):
    """Set the part of ``patch`` (H, W, C; a numpy array or a torch tensor, changed in place and returned)
    that lies past the read level's edge (``level_size`` = width, height) to white."""
    level_w, level_h = level_size
    lx, ly = int(math.floor(xy[0] / downsample)), int(math.floor(xy[1] / downsample))
    patch[max(0, level_h - ly):, :] = 255
    patch[:, max(0, level_w - lx):] = 255
    patch[: max(0, -ly), :] = 255
    patch[:, : max(0, -lx)] = 255
    return patch
