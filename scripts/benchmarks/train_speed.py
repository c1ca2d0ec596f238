"""Training speed of a MIL network: bags/s and peak memory for one epoch over synthetic bags.

    python -m scripts.benchmarks.train_speed [--bags 1000] [--instances 5000] [--dim 768] \\
        [--batch_size 12] [--method smile] [--devices cpu,cuda] [--threads N] [--out speed.json]

One training epoch (the bundle's ignite trainer: packed batches, Ranger, BCE) over ``bags`` synthetic
bags of ``instances`` x ``dim`` features. To keep host memory small the bags share a pool of 16
random feature tensors (the network cannot tell). The figure printed per device: bags/s, instances/s,
epoch seconds, and peak memory (CPU: the process's peak resident set size, which includes the
feature pool; GPU: ``torch.cuda.max_memory_allocated``). A GPU is used when one is available.
"""

from __future__ import annotations

import functools
import json
import resource

import torch

from scripts.data.bags import Bag
from scripts.networks import build_mil_network
from scripts.utils.io_utils import write_json
from scripts.workflows.training import TrainSettings, train_fold


def synthetic_bags(n_bags: int, instances: int, dim: int, pool: int = 16, seed: int = 0) -> list[Bag]:
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(instances, dim, generator=gen) for _ in range(min(pool, n_bags))]
    return [Bag(f"b{i}", i % 2, f"b{i}", features=tensors[i % len(tensors)]) for i in range(n_bags)]


def measure(device: str, bags: list[Bag], method: str, batch_size: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(int(threads))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    settings = TrainSettings(epochs=1, batch_size=batch_size, device=device, patience=0, num_workers=0)
    model, history = train_fold(functools.partial(build_mil_network, method), bags, [], settings, desc=f"{method} on {device}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = history["seconds"]  # the trainer's run (the epoch), not the setup
    instances = sum(int(b.features.shape[0]) for b in bags)
    result = {
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "bags": len(bags),
        "batch_size": batch_size,
        "epoch_seconds": seconds,
        "bags_per_s": len(bags) / seconds,
        "instances_per_s": instances / seconds,
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main(
    bags: int = 1000,
    instances: int = 5000,
    dim: int = 768,
    batch_size: int = 12,
    method: str = "smile",
    devices: str | None = None,
    threads: int | None = None,
    out: str | None = None,
) -> None:
    if devices is None:
        devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(devices, (list, tuple)):
        devices = ",".join(devices)
    pool = synthetic_bags(bags, instances, dim)
    results = []
    for device in [d.strip() for d in devices.split(",") if d.strip()]:
        r = measure(device, pool, method, batch_size, threads)
        results.append(r)
        line = (
            f"{method} training, {r['bags']} bags of {instances}x{dim}, batch {batch_size}, {r['device']} "
            f"({r['torch_threads']} threads): {r['bags_per_s']:.1f} bags/s, {r['instances_per_s'] / 1e3:.0f}k instances/s, "
            f"epoch {r['epoch_seconds']:.1f} s, peak host RSS {r['peak_host_rss_gib']:.2f} GiB"
        )
        if "peak_gpu_memory_gib" in r:
            line += f", peak GPU memory {r['peak_gpu_memory_gib']:.2f} GiB"
        print(line, flush=True)
    if out:
        write_json(out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
