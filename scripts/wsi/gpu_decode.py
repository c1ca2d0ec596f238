"""Decoding patches on the GPU with cuCIM (``read_region(..., device="cuda")``, nvJPEG), for extraction on
CUDA machines: patches reach the encoder as CUDA tensors without a round trip through host memory.

* :func:`resolve_decode_device` turns the ``decode_device`` option (``cpu`` / ``cuda`` / ``auto``) into
  ``"cpu"`` or ``"cuda"``: ``auto`` is ``cuda`` only when the encoder runs on CUDA, torch sees a GPU and
  cuCIM can hand over CUDA memory (CuPy with a CUDA device); ``cuda`` where that is not so is a
  :class:`DecodeDeviceError` that names the fix.
* :func:`cucim_cuda_batches` reads a patch grid with cuCIM's batched reader into CUDA memory, takes each
  batch as a torch tensor through ``__cuda_array_interface__`` / DLPack (CuPy), paints areas past the slide
  edge white and resizes to the output size on the GPU.
* :func:`resize_patches` is that resize for uint8 (B, H, W, 3) tensors on any device (antialiased bilinear,
  like the CPU path's PIL resize; not bit-identical to it).

Status: written and tested on CPU only (device resolution, errors, the tensor resize); the CUDA read itself
has not run on a GPU and its speed is unmeasured (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from scripts.utils.errors import BundleError
from scripts.wsi.backends.base import SlideReadError
from scripts.wsi.edges import crosses_edge, paint_outside_white

DECODE_DEVICES = ("cpu", "cuda", "auto")


class DecodeDeviceError(BundleError, ValueError):
    """``decode_device`` asks for something this machine or this configuration cannot do."""


def cuda_decode_support() -> tuple[bool, str]:
    """(True, "") when cuCIM can decode into CUDA memory here, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        import cucim  # noqa: F401
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "CuPy sees no CUDA device"
    except Exception as error:  # noqa: BLE001 - any import or driver failure means no GPU decode
        return False, f"cuCIM/CuPy with CUDA is not usable ({type(error).__name__}: {error})"
    return True, ""


def resolve_decode_device(decode_device: str | None, device: str | torch.device = "cpu") -> str:
    """``"cpu"`` or ``"cuda"`` for the ``decode_device`` option, given the encoder's ``device``.

    ``auto`` (or None): ``cuda`` when the encoder runs on CUDA and :func:`cuda_decode_support` says yes,
    else ``cpu``. ``cuda`` when that is not so raises :class:`DecodeDeviceError` naming the fix.
    """
    value = "auto" if decode_device in (None, "") else str(decode_device).strip().lower()
    if value not in DECODE_DEVICES:
        raise DecodeDeviceError(f"decode_device {decode_device!r}: choose one of {', '.join(DECODE_DEVICES)}")
    if value == "cpu":
        return "cpu"
    on_cuda = torch.device(device).type == "cuda"
    supported, why = cuda_decode_support() if on_cuda else (False, f"the encoder runs on {torch.device(device)}")
    if supported:
        return "cuda"
    if value == "cuda":
        raise DecodeDeviceError(
            f"decode_device 'cuda' needs a CUDA GPU for the encoder and cuCIM with CUDA support, but {why}. "
            f"Fix: --decode_device cpu (or auto), or run on a CUDA machine with cucim-cu12/cu13 and cupy installed")
    return "cpu"


def resize_patches(patches: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, out_size, out_size, 3) on the same device (antialiased bilinear,
    rounded); returned unchanged when already that size."""
    if patches.shape[1] == out_size and patches.shape[2] == out_size:
        return patches
    x = patches.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False,
                                        antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def cucim_cuda_batches(image, coords: np.ndarray, size: int, level: int, out_size: int, batch_size: int,
                       num_workers: int, downsample: float, level_size: tuple[int, int],
                       cuda_device: torch.device | str = "cuda") -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """``(patches uint8 (B, out_size, out_size, 3) on CUDA, coords (B, 2))`` read by cuCIM ``image`` (a
    ``CuImage``) with ``device="cuda"`` (nvJPEG), in the order of ``coords``."""
    import cupy

    locations = [(int(x), int(y)) for x, y in coords]
    results = image.read_region(locations, (size, size), level, num_workers=max(1, int(num_workers)),
                                batch_size=batch_size, drop_last=False, device="cuda")
    if not hasattr(results, "__next__") and not isinstance(results, (list, tuple)):
        results = [results]  # a single location comes back as one image
    start = 0
    for batch in results:
        # a torch tensor over cuCIM's CUDA buffer (__cuda_array_interface__ via CuPy, then DLPack); cloned
        # because cuCIM reuses the buffer once the iterator advances
        tensor = torch.from_dlpack(cupy.asarray(batch)).to(cuda_device).clone()
        if tensor.ndim == 3:
            tensor = tensor[None]
        tensor = tensor[..., :3]
        chunk = coords[start:start + len(tensor)]
        for patch, xy in zip(tensor, chunk):
            if crosses_edge(xy, size, downsample, level_size):  # cuCIM pads with black
                paint_outside_white(patch, xy, size, downsample, level_size)
        start += len(tensor)
        yield resize_patches(tensor, int(out_size)), chunk
    if start != len(coords):
        raise SlideReadError(f"cuCIM (CUDA decode) returned {start} of {len(coords)} patches")
