"""cuCIM GPU decode (``decode_device``): what can be checked without a GPU.

The CUDA read itself (``read_region(..., device="cuda")``) has not run here: these tests cover the option's
resolution, the error on a machine without CUDA, and that the GPU path's tensor resize + the encoder input
step give the CPU path's encoder input on real patches of the CMU-1 region.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from scripts.wsi import gpu_decode
from scripts.wsi.gpu_decode import DecodeDeviceError, resize_patches, resolve_decode_device

NO_CUDA = not torch.cuda.is_available()


def test_decode_device_resolution(monkeypatch):
    monkeypatch.setattr(gpu_decode, "cuda_decode_support", lambda: (True, ""))
    assert resolve_decode_device("auto", "cuda") == "cuda"
    assert resolve_decode_device(None, "cuda:0") == "cuda"
    assert resolve_decode_device("CUDA", "cuda") == "cuda"
    assert resolve_decode_device("cpu", "cuda") == "cpu"  # asked for: CPU decode even with a GPU
    assert resolve_decode_device("auto", "cpu") == "cpu"  # the encoder on the CPU: no GPU decode
    with pytest.raises(DecodeDeviceError, match="runs on cpu"):
        resolve_decode_device("cuda", "cpu")
    monkeypatch.setattr(gpu_decode, "cuda_decode_support", lambda: (False, "CuPy sees no CUDA device"))
    assert resolve_decode_device("auto", "cuda") == "cpu"
    with pytest.raises(DecodeDeviceError, match="CuPy sees no CUDA device"):
        resolve_decode_device("cuda", "cuda")
    with pytest.raises(DecodeDeviceError, match="choose one of cpu, cuda, auto"):
        resolve_decode_device("gpu", "cuda")


@pytest.mark.skipif(not NO_CUDA, reason="checks the behaviour on a machine without CUDA")
def test_cuda_decode_without_cuda_is_one_clear_error(bundle_root, tmp_path):
    supported, why = gpu_decode.cuda_decode_support()
    assert not supported and "no CUDA device" in why
    assert resolve_decode_device("auto", "cpu") == "cpu"  # the default on CPU machines: unchanged
    with pytest.raises(DecodeDeviceError) as raised:
        resolve_decode_device("cuda", "cpu")
    assert "--decode_device cpu" in str(raised.value)
    from scripts.transforms import ReadPatchesd

    with pytest.raises(DecodeDeviceError):
        ReadPatchesd("wsi", decode_device="cuda")
    datalist = tmp_path / "datalist.csv"
    datalist.write_text("slide_id,path\ns0,slide.svs\n")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/extract.json",
           "--datalist", str(datalist), "--output_dir", str(tmp_path / "out"), "--decode_device", "cuda",
           "--allow_random_weights", "true", "--encoder_weights", str(tmp_path / "absent.pth")]
    proc = subprocess.run(cmd, cwd=bundle_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "decode_device 'cuda'" in errors[0] and "--decode_device cpu" in errors[0]


def test_gpu_side_resize_and_normalise_match_the_cpu_path(shared_slides):
    """On CPU tensors, the GPU path's steps (torch resize of the read region to the patch size, then
    EncoderInputd on the tensor) give the CPU path's encoder input (PIL resize, EncoderInputd) to within
    one grey level, on real patches read at the CMU-1 region's read size (257 px -> 256 px)."""
    from scripts.networks.encoders import build_encoder
    from scripts.transforms import EncoderInputd
    from scripts.wsi.patches import iter_patch_batches, resize_rgb

    slide = shared_slides / "cmu-1-small-region.svs"
    coords = np.array([[600, 500], [857, 500], [1200, 900], [2000, 2800]])  # the last one crosses the edge
    raw = np.concatenate([b for b, _ in iter_patch_batches(slide, coords, 257, 0, 257, backends=("openslide",))])
    cpu_patches = np.stack([resize_rgb(p, 256) for p in raw])
    gpu_patches = resize_patches(torch.from_numpy(raw), 256)
    assert gpu_patches.dtype == torch.uint8 and gpu_patches.shape == (4, 256, 256, 3)
    assert np.abs(gpu_patches.numpy().astype(int) - cpu_patches.astype(int)).max() <= 1
    encoder = build_encoder("ctranspath", weights="/nonexistent.pth", allow_random_weights=True)
    to_input = EncoderInputd("patches", encoder=encoder)
    cpu_input = to_input({"patches": cpu_patches})["patches"]
    gpu_input = to_input({"patches": gpu_patches})["patches"]
    one_level = 1.0 / 255 / min(encoder.std)
    assert cpu_input.shape == gpu_input.shape == (4, 3, 224, 224)
    assert (gpu_input - cpu_input).abs().max().item() <= one_level + 1e-6
    assert torch.equal(resize_patches(gpu_patches, 256), gpu_patches)  # already the size: unchanged


def test_edge_painting_is_shared_by_both_paths():
    """cuCIM pads past-the-edge areas black; both decode paths paint them white with the same helper, on
    numpy arrays (CPU) and torch tensors (GPU) alike."""
    from scripts.wsi.edges import crosses_edge, paint_outside_white

    level_size = (300, 250)  # width, height of the read level
    assert not crosses_edge((0, 0), 200, 1.0, level_size) and crosses_edge((150, 0), 200, 1.0, level_size)
    array = paint_outside_white(np.zeros((200, 200, 3), np.uint8), (150, 100), 200, 1.0, level_size)
    tensor = paint_outside_white(torch.zeros((200, 200, 3), dtype=torch.uint8), (150, 100), 200, 1.0, level_size)
    assert np.array_equal(array, tensor.numpy())
    assert (array[:150, :150] == 0).all() and (array[150:] == 255).all() and (array[:, 150:] == 255).all()
