"""Patch-reading throughput: cuCIM batched ``read_region`` (C++ thread pool) vs one patch at a time.

    python -m scripts.benchmarks.read_patches --slide <path> [--mpp 0.25] [--num_workers 2]
        [--batch_size 64] [--patch_size 256] [--target_mpp 0.5] [--max_patches 2000] [--repeats 2]

The grid is every whole patch of the slide at ``target_mpp`` (tissue or not, so the figure does not
depend on the mask), read at the level ``scripts.wsi.grid`` picks and resized to ``patch_size``. Each
mode reads the same grid ``repeats`` times after a warm-up pass; the best time is reported.
Prints patches/s for: cuCIM batched (num_workers threads), cuCIM one-by-one (CuImage.read_region in a
loop), and the backend-neutral ``SlideHandle.read_region`` loop (MONAI WSIReader path).
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from scripts.utils.quiet import native_output_silenced
from scripts.wsi.backends.base import to_rgb
from scripts.wsi.grid import choose_level
from scripts.wsi.open import open_slide
from scripts.wsi.patches import iter_patch_batches, resize_rgb


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (file cache, decoder set-up)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(slide: str, mpp: float | None = None, num_workers: int = 2, batch_size: int = 64, patch_size: int = 256,
         target_mpp: float = 0.5, max_patches: int = 2000, repeats: int = 2) -> None:
    with open_slide(slide, mpp=mpp) as handle:
        level = choose_level(handle.level_downsamples, handle.mpp, target_mpp)
        ds = handle.level_downsamples[level]
        size0 = patch_size * target_mpp / handle.mpp
        read_size = max(1, int(round(size0 / ds)))
        width, height = handle.dimensions
        xs = np.arange(0, width - size0 + 1, size0).astype(int)
        ys = np.arange(0, height - size0 + 1, size0).astype(int)
        coords = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)[:max_patches]
        backend = handle.backend
        n = len(coords)
        print(f"slide {slide}: {width}x{height} px, mpp {handle.mpp} ({handle.mpp_source}), backend {backend}")
        print(f"grid: {n} patches, level {level} (downsample {ds:.4f}), read {read_size}px -> {patch_size}px")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible")

        def handle_loop():
            for x, y in coords:
                resize_rgb(handle.read_region((int(x), int(y)), (read_size, read_size), level), patch_size)

        t_handle = _best(handle_loop, repeats)

    results = {}
    if backend == "cucim":
        from cucim import CuImage

        with native_output_silenced():
            image = CuImage(str(slide))

        def cucim_loop():
            for x, y in coords:
                patch = to_rgb(np.asarray(image.read_region((int(x), int(y)), (read_size, read_size), level)))
                resize_rgb(patch, patch_size)

        def cucim_batched():
            for _ in iter_patch_batches(slide, coords, read_size, level, patch_size, batch_size, num_workers):
                pass

        results[f"cuCIM batched read_region ({num_workers} threads, batch {batch_size})"] = _best(cucim_batched, repeats)
        results["cuCIM read_region, one patch at a time"] = _best(cucim_loop, repeats)
    results[f"SlideHandle.read_region loop ({backend} via MONAI WSIReader / fallback)"] = t_handle
    for name, seconds in results.items():
        print(f"{name:70s} {n / seconds:9.1f} patches/s  ({seconds:.3f} s for {n})")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
