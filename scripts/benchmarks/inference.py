"""Memory and time of the MIL + output part of inference on large synthetic slides.

    python -m scripts.benchmarks.inference                       # 1,500 / 5,000 / 15,000 patches, 5 folds
    python -m scripts.benchmarks.inference --sizes "[15000]" --n_models 1

Each size runs in a fresh child process so its peak resident memory (``ru_maxrss``) is its own. The
child writes a synthetic feature file (N x 768 float32, written in blocks), builds ``n_models`` random
SMILE fold models, then times reading the features, the fold ensemble and every writer (attention
HDF5, heat map, top-k sheet, GeoJSON). It prints the peak RSS above the baseline measured after the
imports and model set-up: memory grows linearly with N (the bag itself is N x 768 x 4 bytes), with no
N x N term. Numbers are figures for the README, not a test.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import matplotlib.backends.backend_agg  # noqa: F401  (loaded before the memory baseline: not a per-slide cost)
import numpy as np
import torch

from scripts.engines.ensemble import predict_bag
from scripts.formats.attention_outputs import write_attention_h5, write_geojson, write_heatmap_png, write_topk_png
from scripts.formats.feature_file import read_features
from scripts.networks.bag_classifier import BagClassifier


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def run_one(n_patches: int, n_models: int = 5, workdir: str | None = None, seed: int = 0) -> dict:
    """The measurement itself (run in a child process by :func:`main`)."""
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="bench_inference_"))
    work.mkdir(parents=True, exist_ok=True)
    patch_l0 = 512  # 256 px at 0.5 um/px on a 0.25 um/px scan
    side = int(np.ceil(np.sqrt(n_patches)))
    xs, ys = np.meshgrid(np.arange(side) * patch_l0, np.arange(side) * patch_l0)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)[:n_patches].astype(np.int64)
    slide_size = (side * patch_l0, side * patch_l0)
    feature_file = work / "features.h5"
    with h5py.File(feature_file, "w") as handle:
        ds = handle.create_dataset("features", shape=(n_patches, 768), dtype="float32")
        for start in range(0, n_patches, 2048):
            stop = min(n_patches, start + 2048)
            ds[start:stop] = rng.standard_normal((stop - start, 768), dtype=np.float32)
        handle.create_dataset("coords", data=coords)
    models = [BagClassifier("smile").eval() for _ in range(n_models)]
    thumb_side = 1024
    thumbnail = np.full((thumb_side, thumb_side, 3), 235, np.uint8)
    downsample = slide_size[0] / thumb_side
    baseline = _rss_mb()

    timings = {}
    start = time.perf_counter()
    features, coords_read = read_features(feature_file)
    timings["read features"] = time.perf_counter() - start
    start = time.perf_counter()
    probability, attention, _ = predict_bag(models, features)
    timings[f"MIL ({n_models} models)"] = time.perf_counter() - start
    del features
    out = work / "out"
    start = time.perf_counter()
    write_attention_h5(out / "attention.h5", coords_read, attention, patch_l0)
    timings["attention h5"] = time.perf_counter() - start
    start = time.perf_counter()
    write_heatmap_png(out / "heatmap.png", thumbnail, downsample, coords_read, patch_l0, attention, title="benchmark")
    timings["heat map"] = time.perf_counter() - start
    start = time.perf_counter()
    write_topk_png(out / "topk.png", lambda x, y: np.full((256, 256, 3), 200, np.uint8), coords_read, attention, k=8)
    timings["top-k sheet"] = time.perf_counter() - start
    start = time.perf_counter()
    write_geojson(out / "tiles.geojson", coords_read, attention, patch_l0, slide_size=slide_size)
    timings["GeoJSON"] = time.perf_counter() - start
    return {
        "n_patches": n_patches,
        "n_models": n_models,
        "probability": probability,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _rss_mb(),
        "bag_mb": n_patches * 768 * 4 / 2**20,
        "geojson_mb": (out / "tiles.geojson").stat().st_size / 2**20,
        "seconds": timings,
    }


def main(sizes: list[int] | tuple[int, ...] = (1500, 5000, 15000), n_models: int = 5) -> None:
    """Run each size in a child process and print one table."""
    results = []
    for n in sizes:
        code = ("import json, sys; from scripts.benchmarks.inference import run_one; "
                f"print('RESULT' + json.dumps(run_one({int(n)}, {int(n_models)})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"benchmark child for {n} patches failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT"):]))
    stages = list(results[0]["seconds"])
    print(f"\nMIL + outputs on synthetic bags (768-d features, {n_models} fold models, CPU, 2 threads)")
    print(f"{'patches':>8} {'bag MB':>7} {'base RSS':>9} {'peak RSS':>9} {'extra':>7} {'GeoJSON MB':>10}  "
          + "  ".join(f"{s:>14}" for s in stages))
    for r in results:
        extra = r["peak_rss_mb"] - r["baseline_rss_mb"]
        print(f"{r['n_patches']:>8} {r['bag_mb']:>7.1f} {r['baseline_rss_mb']:>9.0f} {r['peak_rss_mb']:>9.0f} "
              f"{extra:>7.0f} {r['geojson_mb']:>10.1f}  " + "  ".join(f"{r['seconds'][s]:>13.2f}s" for s in stages))
    print("RSS in MiB; 'extra' = peak minus the baseline after imports and model set-up.")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
