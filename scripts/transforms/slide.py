"""MONAI dictionary transforms for one slide (see :mod:`scripts.transforms`).

Why not MONAI's ``ForegroundMaskd`` / ``GridPatchd``: they work on an image array in memory, while a
whole-slide image is read lazily at the level chosen for the target um/px; the steps here read only
a low-resolution image for the mask and only the grid's patches, and keep the coordinates identical to
the bundle's patch files. The pixel work is in :mod:`scripts.wsi` (tissue mask with ITK morphology,
patch grid, batched reading); these classes are the swappable, config-declared wrappers.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.wsi.gpu_decode import resolve_decode_device
from scripts.wsi.grid import patch_grid
from scripts.wsi.open import DEFAULT_BACKENDS
from scripts.wsi.patches import PatchReader, iter_patch_batches
from scripts.wsi.reader import SlideWSIReader
from scripts.wsi.tissue import TissueParams, tissue_mask


class OpenSlided(MapTransform):
    """Open the slide at ``data[key]`` with ``reader`` (a :class:`SlideWSIReader`); sets ``data["wsi"]`` and
    ``data["mpp"]`` (the trusted level-0 um/px; the dictionary's own ``mpp`` overrides the metadata)."""

    def __init__(self, keys: KeysCollection = "image", reader: SlideWSIReader | None = None,
                 wsi_key: str = "wsi", slide_id_key: str = "slide_id") -> None:
        super().__init__(keys)
        self.reader = reader or SlideWSIReader()
        self.wsi_key, self.slide_id_key = wsi_key, slide_id_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            handle = self.reader.read(d[key], mpp=d.get("mpp"), slide_id=d.get(self.slide_id_key))
            d[self.wsi_key] = handle
            d["mpp"] = handle.mpp
            d["mpp_source"] = handle.mpp_source
            d["backend"] = handle.backend
        return d


class TissueMaskd(MapTransform):
    """Tissue mask on a low-resolution image of ``data["wsi"]``: saturation above Otsu (at least
    ``params.min_saturation``), then closing, opening, hole filling and small-object removal (ITK, or
    scipy). The image is read at ``mask_mpp`` um/px, never larger than ``max_mask_side`` pixels."""

    def __init__(self, keys: KeysCollection = "wsi", params: TissueParams | None = None, mask_mpp: float = 4.0,
                 max_mask_side: int = 4096) -> None:
        super().__init__(keys)
        self.params = params or TissueParams()
        self.mask_mpp, self.max_mask_side = float(mask_mpp), int(max_mask_side)

    def thumbnail(self, handle) -> tuple[np.ndarray, float]:
        """The low-resolution RGB image and its exact level-0 pixels per image pixel."""
        width, height = handle.dimensions
        downsample = max(1.0, self.mask_mpp / handle.mpp, max(width, height) / float(self.max_mask_side))
        thumb = handle.read_scaled(downsample)
        return thumb, width / float(thumb.shape[1])

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            handle = d[key]
            thumb, downsample = self.thumbnail(handle)
            mask, info = tissue_mask(thumb, handle.mpp * downsample, self.params)
            d.update(thumbnail=thumb, mask_downsample=downsample, tissue_mask=mask, tissue_info=info)
        return d


class PatchGridd(MapTransform):
    """Grid of ``patch_size`` px patches at ``target_mpp`` kept where the tissue mask covers at least
    ``min_tissue_fraction`` of the patch; sets ``data["grid"]`` (a :class:`scripts.wsi.grid.PatchGrid`:
    level-0 coords, read level and read size) and ``data["coords"]``."""

    def __init__(self, keys: KeysCollection = "wsi", patch_size: int = 256, target_mpp: float = 0.5,
                 overlap: float = 0.0, min_tissue_fraction: float = 0.5, mask_key: str = "tissue_mask") -> None:
        super().__init__(keys)
        self.patch_size, self.target_mpp = int(patch_size), float(target_mpp)
        self.overlap, self.min_tissue_fraction = float(overlap), float(min_tissue_fraction)
        self.mask_key = mask_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            handle = d[key]
            grid = patch_grid(handle.dimensions, handle.level_downsamples, handle.mpp, d[self.mask_key],
                              d["mask_downsample"], self.patch_size, self.target_mpp, self.overlap,
                              self.min_tissue_fraction)
            d["grid"] = grid
            d["coords"] = grid.coords
        return d


class ReadPatchesd(MapTransform):
    """``data["patches"]``: an iterator of ``(patches (B, out, out, 3) uint8, coords (B, 2))`` over
    ``data["coords"]``, read at ``data["level"]`` as ``data["read_size"]`` squares (from ``data["grid"]`` when
    present) and resized to ``out_size`` (``None``: ``data["patch_size"]``, else 256).

    ``data[key]`` is an open slide (the ``SlideHandle`` :class:`OpenSlided` sets; the caller closes it) or a
    path (opened with ``backends`` and closed when the iterator ends). Reading is lazy: nothing is read until
    the iterator is consumed, in batches of ``batch_size`` (cuCIM's batched reads when the probe accepted
    the file, else ``num_workers`` threads; :class:`scripts.wsi.patches.PatchReader`).

    ``decode_device``: ``cpu``, ``cuda`` (cuCIM decodes on the GPU and the batches are CUDA tensors; other
    backends still decode on the CPU) or ``auto`` (``cuda`` when the encoder's ``device`` is CUDA and a GPU
    and cuCIM with CUDA are usable): :func:`scripts.wsi.gpu_decode.resolve_decode_device`.
    ``data["decode_device"]`` says what was used.
    """

    def __init__(self, keys: KeysCollection = "wsi", backends: Sequence[str] | None = None,
                 out_size: int | None = None, batch_size: int = 32, num_workers: int = 2,
                 decode_device: str = "cpu", device: str | torch.device | None = None) -> None:
        super().__init__(keys)
        self.backends = tuple(backends) if backends else None
        self.out_size = None if out_size is None else int(out_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.decode_device = resolve_decode_device(decode_device, device)

    def __call__(self, data):
        d = dict(data)
        grid = d.get("grid")
        level = int(d["level"] if grid is None else grid.level)
        read_size = int(d["read_size"] if grid is None else grid.read_size_level)
        out_size = self.out_size or int(d.get("patch_size") or 256)
        args = (d["coords"], read_size, level, out_size, self.batch_size, self.num_workers, self.decode_device)
        for key in self.key_iterator(d):
            source = d[key]
            if isinstance(source, (str, os.PathLike)):
                d["patches"] = iter_patch_batches(source, *args, backends=self.backends or DEFAULT_BACKENDS)
                d["decode_device"] = self.decode_device  # (a non-cuCIM file still decodes on the CPU)
            else:
                gpu = self.decode_device == "cuda" and source.backend == "cucim"
                d["patches"] = PatchReader(handle=source).batches(*args)
                d["decode_device"] = "cuda" if gpu else "cpu"
                if gpu:
                    d["backend"] = f"{source.backend} (cuda decode)"
        return d


class EncoderInputd(MapTransform):
    """A batch of RGB uint8 patches (B, H, W, 3) -> float (B, 3, size, size): bilinear resize and per-channel
    normalisation, on the batch's device. With ``encoder`` (a :class:`scripts.networks.encoders.Encoder`) it
    is that encoder's own preprocessing; else ``size``/``mean``/``std`` (ImageNet statistics by default)."""

    def __init__(self, keys: KeysCollection = "patches", encoder=None, size: int = 224,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        super().__init__(keys)
        self.encoder = encoder
        self.size = int(size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            batch = torch.as_tensor(d[key])
            if self.encoder is not None:
                d[key] = self.encoder.preprocess(batch)
                continue
            x = batch.permute(0, 3, 1, 2).float().div_(255.0)
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                    align_corners=False, antialias=True)
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            d[key] = (x - mean) / std
        return d
