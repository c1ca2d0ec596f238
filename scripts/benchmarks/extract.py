"""Feature extraction throughput: reading only, encoder only, end to end (patches/s).

    python -m scripts.benchmarks.extract [--slide PATH] [--n_patches 64] [--batch_sizes 8,32]
        [--encoder ctranspath] [--weights models/ctranspath.pth] [--device auto] [--compile auto]
        [--num_workers 2] [--threads 0] [--precisions auto|fp32,bf16]

* reading: ``scripts.wsi.patches.iter_patch_batches`` over a grid of 256-px patches of the slide (decode + copy, no encoder);
* encoder: uint8 patches already in memory -> preprocessing (resize 256->224, normalise) -> encoder;
  on CUDA in bf16 autocast, for each batch size, without and with ``torch.compile``; ``--precisions
  fp32,bf16`` times the encoder in each precision, one after the other in the same run (on CPUs with
  native bfloat16, AVX512-BF16 or AMX, bf16 autocast is the faster one; without, the slower);
* end to end: the extraction workflow on those patches (reader thread + encoder + HDF5 writing);
* precision: the features of the same real patches of the slide with bf16 autocast versus fp32 on the
  chosen device (CPU autocast runs bf16 too): per-patch cosine similarity (min, mean), relative L2
  difference (mean, max) and the largest element difference relative to the patch's largest fp32
  feature ("max rel"). Extraction's ``precision`` option picks one of the two; feature files record it.
Random weights are used when the weights file is absent: the speed is the same (the precision figures
depend on the weights: measure with the released ones for a statement about real features).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

import scripts  # noqa: F401  (quiet native libraries)
from scripts.formats.layout import OutputLayout
from scripts.networks.encoders import build_encoder
from scripts.workflows.extract import FeatureExtractionWorkflow
from scripts.wsi.open import DEFAULT_BACKENDS
from scripts.wsi.patches import PatchReader, iter_patch_batches

_SHARED = Path(os.environ.get("SMILE_SHARED_DIR", Path(__file__).resolve().parents[2].parent / "shared"))
DEFAULT_SLIDE = _SHARED / "data" / "slides" / "cmu-1-small-region.svs"


def _grid(slide: Path, n: int, size: int = 256) -> np.ndarray:
    with PatchReader(slide) as reader:
        width, height = reader.handle.dimensions
    xs, ys = np.arange(0, width - size + 1, size), np.arange(0, height - size + 1, size)
    grid = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
    if len(grid) == 0:
        raise ValueError(f"{slide} is smaller than one {size}-px patch")
    return np.resize(grid, (n, 2))  # repeat the grid when the slide is small


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10.1f}"


def bench_reading(slide, coords, batch_size, num_workers, backends=DEFAULT_BACKENDS, repeats=2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(b) for b, _ in iter_patch_batches(slide, coords, 256, 0, 256, batch_size, num_workers, backends=backends))
        best = min(best, time.perf_counter() - start)
    return n / best


def bench_encoder(encoder, device, batch_size, n_patches, compiled=False) -> float:
    model = encoder.model
    encoder.to(device)
    if compiled:
        encoder.model = torch.compile(model)
    images = torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8, device=device)
    try:
        for _ in range(2 if compiled else 1):  # warm-up (and compilation)
            encoder(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n_batches = max(1, n_patches // batch_size)
        start = time.perf_counter()
        for _ in range(n_batches):
            encoder(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n_batches * batch_size / (time.perf_counter() - start)
    finally:
        encoder.model = model


def bench_precision(encoder, device, slide, n_patches: int = 64, batch_size: int = 16) -> dict:
    """bf16 autocast vs fp32 features of the same ``n_patches`` real patches of ``slide`` on ``device``."""
    coords = _grid(slide, n_patches)
    patches = np.concatenate([b for b, _ in iter_patch_batches(slide, coords, 256, 0, 256, batch_size, 1, backends=DEFAULT_BACKENDS)])
    encoder.to(device)
    before = encoder.precision
    out = {}
    try:
        for precision in ("fp32", "bf16"):
            encoder.precision = precision
            out[precision] = torch.cat([encoder(torch.from_numpy(patches[i:i + batch_size]).to(device)).cpu()
                                        for i in range(0, len(patches), batch_size)]).double()  # fmt: skip
    finally:
        encoder.precision = before
    a, b = out["fp32"], out["bf16"]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    rel_l2 = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
    max_rel = ((a - b).abs().amax(dim=1) / a.abs().amax(dim=1).clamp_min(1e-12))
    return {"n_patches": len(patches), "device": str(device), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "rel_l2_mean": float(rel_l2.mean()), "rel_l2_max": float(rel_l2.max()), "max_rel": float(max_rel.max())}  # fmt: skip


def bench_end_to_end(slide, coords, encoder, device, batch_size, num_workers) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        layout = OutputLayout(out)
        layout.ensure(layout.patches_dir)
        with h5py.File(layout.patch_file("bench"), "w") as h5:
            h5["coords"] = coords
            h5.attrs.update(patch_size=256, level=0, level_downsample=1.0, patch_size_level0=256,
                            slide_path=str(slide))
        datalist = out / "datalist.csv"
        datalist.write_text(f"slide_id,path,label,patient_id,center\nbench,{slide},,p,c\n")
        workflow = FeatureExtractionWorkflow(datalist, out, encoder, device=device, batch_size=batch_size,
                                             num_workers=num_workers, progress=False, distributed=False)
        start = time.perf_counter()
        rows = workflow.run()
        seconds = time.perf_counter() - start
        if rows[0]["status"] != "ok":
            raise RuntimeError(f"end-to-end run failed: {rows[0]['error']}")
        return len(coords) / seconds


def main(
    slide: str = str(DEFAULT_SLIDE),
    n_patches: int = 64,
    batch_sizes: str | tuple = "8,32",
    encoder: str = "ctranspath",
    weights: str = "models/ctranspath.pth",
    device: str = "auto",
    compile: str = "auto",
    num_workers: int = 2,
    threads: int = 0,
    read_patches_n: int = 512,
    precision_patches: int = 64,
    precisions: str | tuple = "auto",
) -> None:
    """Print patches/s for reading only, encoder only (per batch size, +/- torch.compile) and end to end."""
    slide = Path(slide)
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    sizes = [int(b) for b in (batch_sizes.split(",") if isinstance(batch_sizes, str) else batch_sizes)]
    compile_modes = {"auto": [False, True] if dev.type == "cuda" else [False], "true": [True], "false": [False],
                     "both": [False, True]}[str(compile).lower()]
    enc = build_encoder(encoder, weights=weights, allow_random_weights=True)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none"
    load = ", load average %.1f (other processes share these cores)" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"# hardware: {os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}, GPU {gpu}{load}")
    print(f"# torch {torch.__version__}, encoder {encoder} ({'random' if enc.random_weights else 'released'} "
          f"weights), precision {'bf16 autocast' if dev.type == 'cuda' else 'fp32'} (extraction default 'auto'), "
          f"slide {slide.name}")
    print(f"{'stage':<34}{'batch':>6}{'patches/s':>12}")

    coords = _grid(slide, read_patches_n)
    for bs in sorted(set(sizes) | {32}):
        print(f"{'reading (workers=%d)' % num_workers:<34}{bs:>6}{_rate(1, 1 / bench_reading(slide, coords, bs, num_workers))}")
    if isinstance(precisions, str):
        precisions = precisions.split(",")
    default_precision = enc.precision
    for precision in precisions:
        enc.precision = precision.strip()
        for compiled in compile_modes:
            for bs in sizes:
                rate = bench_encoder(enc, dev, bs, max(n_patches, bs * 3 if dev.type == "cuda" else n_patches), compiled)
                label = "encoder" + (" + torch.compile" if compiled else "") + ("" if enc.precision == "auto" else f" ({enc.precision})")
                print(f"{label:<34}{bs:>6}{rate:12.1f}")
    enc.precision = default_precision
    e2e_bs = max(sizes)
    rate = bench_end_to_end(slide, _grid(slide, n_patches), enc, dev, e2e_bs, num_workers)
    print(f"{'end to end (workflow)':<34}{e2e_bs:>6}{rate:12.1f}")
    if precision_patches > 0:
        d = bench_precision(enc, dev, slide, precision_patches)
        print(f"# bf16 autocast vs fp32 on {d['device']}, {d['n_patches']} patches of {slide.name}: cosine min "
              f"{d['cosine_min']:.5f} mean {d['cosine_mean']:.5f}; relative L2 mean {d['rel_l2_mean']:.4f} max "
              f"{d['rel_l2_max']:.4f}; max rel {d['max_rel']:.4f}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
