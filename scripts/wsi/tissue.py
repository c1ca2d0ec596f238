"""Tissue mask on a low-resolution image of the slide.

Steps (sizes in microns, converted with the mask's own um/px so results do not depend on the scanner):

1. saturation of the HSV colour model, (max - min) / max of R, G, B, on 0-255;
2. Otsu threshold on the saturation, never below ``min_saturation`` (a blank slide has no real
   foreground; Otsu alone would split its noise in two);
3. morphological closing (joins tissue broken by pale areas) then opening (drops dust), disk radius
   ``closing_um`` / ``opening_um``;
4. hole filling (air spaces inside lung tissue belong to the tissue: STAS lies in them);
5. connected components smaller than ``min_area_um2`` are removed.

``backend="itk"`` runs steps 3-5 with ITK filters (the project's chosen toolkit;
BinaryMorphologicalClosing/Opening with a flat ball, BinaryFillhole, ConnectedComponent +
RelabelComponent). Loading those ITK modules costs ~15 s of CPU per process, so ``backend="scipy"``
gives the same operations with scipy.ndimage in milliseconds; tests check that both agree.
Otsu itself uses scikit-image's ``threshold_otsu`` for both (ITK's Otsu module alone costs ~9 s to load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import itk
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

# Before ITK loads: one thread per filter, no persistent thread pool. Slides run in parallel worker
# processes (forked from a parent that loaded ITK once); a pool's threads would not survive the fork.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")


@dataclass
class TissueParams:
    min_saturation: int = 15  # on 0-255; Otsu threshold floor
    closing_um: float = 16.0
    opening_um: float = 8.0
    fill_holes: bool = True
    min_area_um2: float = 10000.0  # 0.01 mm^2
    backend: str = "itk"  # "itk" or "scipy"


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on 0-255 (uint8) of an RGB uint8 image."""
    rgb = rgb.astype(np.int16)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    sat = np.zeros(high.shape, np.float32)
    nonzero = high > 0
    sat[nonzero] = (high[nonzero] - low[nonzero]) * 255.0 / high[nonzero]
    return np.clip(sat, 0, 255).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> float:
    if values.min() == values.max():
        return float(values.max()) + 1.0
    return float(threshold_otsu(values))


def tissue_mask(rgb: np.ndarray, mask_mpp: float, params: TissueParams | None = None) -> tuple[np.ndarray, dict]:
    """Boolean tissue mask of an RGB uint8 image whose pixels are ``mask_mpp`` microns wide.

    Returns ``(mask, info)`` with info: threshold, tissue_area_mm2, n_components.
    """
    params = params or TissueParams()
    sat = saturation(rgb)
    threshold = max(otsu_threshold(sat), float(params.min_saturation))
    raw = sat > threshold
    close_r = max(0, int(round(params.closing_um / mask_mpp)))
    open_r = max(0, int(round(params.opening_um / mask_mpp)))
    min_px = int(np.ceil(params.min_area_um2 / (mask_mpp * mask_mpp)))
    if params.backend == "itk":
        mask, n_components = _clean_itk(raw, close_r, open_r, params.fill_holes, min_px)
    elif params.backend == "scipy":
        mask, n_components = _clean_scipy(raw, close_r, open_r, params.fill_holes, min_px)
    else:
        raise ValueError(f"tissue mask backend {params.backend!r} is not 'itk' or 'scipy'")
    info = {
        "threshold": threshold,
        "tissue_area_mm2": float(mask.sum()) * mask_mpp * mask_mpp / 1e6,
        "n_components": n_components,
    }
    return mask, info


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _clean_scipy(raw, close_r, open_r, fill_holes, min_px):
    pad = close_r  # pad so that closing does not eat tissue touching the image border
    mask = np.pad(raw, pad, mode="edge") if pad else raw
    if close_r:
        mask = ndi.binary_closing(mask, structure=_disk(close_r))
    if open_r:
        mask = ndi.binary_opening(mask, structure=_disk(open_r))
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
        n = int(keep.sum())
    if pad:
        mask = mask[pad:-pad, pad:-pad]
    return mask.astype(bool), n


_ITK_KERNELS: dict = {}


def _itk_kernel(radius: int):
    kernel = _ITK_KERNELS.get(radius)
    if kernel is None:
        kernel = _ITK_KERNELS[radius] = itk.FlatStructuringElement[2].Ball(radius)
    return kernel


def warm_up_itk() -> None:
    """Load the ITK modules used here (slow once per process; call before forking workers)."""
    _clean_itk(np.zeros((8, 8), bool), 1, 1, True, 1)


def _clean_itk(raw, close_r, open_r, fill_holes, min_px):
    pad = close_r
    mask = np.pad(raw, pad, mode="edge") if pad else raw
    image = itk.image_from_array(mask.astype(np.uint8))
    if close_r:
        image = itk.binary_morphological_closing_image_filter(image, kernel=_itk_kernel(close_r), foreground_value=1)
    if open_r:
        image = itk.binary_morphological_opening_image_filter(
            image, kernel=_itk_kernel(open_r), foreground_value=1, background_value=0
        )
    if fill_holes:
        image = itk.binary_fillhole_image_filter(image, foreground_value=1, fully_connected=False)
    labels = itk.connected_component_image_filter(image, fully_connected=True)
    relabelled = itk.relabel_component_image_filter(labels, minimum_object_size=int(min_px))
    out = itk.array_from_image(relabelled)
    if pad:
        out = out[pad:-pad, pad:-pad]
    return out > 0, int(out.max())
