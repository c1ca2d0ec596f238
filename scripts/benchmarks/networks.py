"""Print parameter count and forward / forward+backward time of every registered MIL network.

    python -m scripts.benchmarks.networks --n_bags 8 --n_instances 2000 --in_dim 768 --device cpu

Bags are random packed features of ``n_instances`` each (sizes vary +-50 %, seeded). Times are the
median of ``repeats`` runs after one warm-up; figures, not assertions.
"""

from __future__ import annotations

import statistics
import time

import torch

import scripts.networks as nets
from scripts.networks.segment_ops import pack_bags


def benchmark(n_bags: int = 8, n_instances: int = 2000, in_dim: int = 768, device: str = "cpu",
              repeats: int = 3, threads: int = 0, names: str = "") -> list[dict]:
    if threads:
        torch.set_num_threads(int(threads))
    g = torch.Generator().manual_seed(0)
    sizes = (torch.rand(n_bags, generator=g) * n_instances + n_instances // 2).long().tolist()
    x, bi = pack_bags([torch.randn(n, in_dim, generator=g) for n in sizes])
    x, bi = x.to(device), bi.to(device)
    labels = (torch.arange(n_bags) % 2).float().to(device)
    chosen = [n for n in names.split(",") if n] if names else sorted(nets.MIL_NETWORKS)
    rows = []
    print(f"{n_bags} bags, {x.shape[0]} instances, {in_dim}-d, {device}, {torch.get_num_threads()} threads")
    print(f"{'network':16s} {'params':>10s} {'fwd eval ms':>12s} {'fwd+bwd ms':>11s}")
    for name in chosen:
        net = nets.build_mil_network(name, in_dim=in_dim).to(device)
        params = sum(p.numel() for p in net.parameters())

        def sync():
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def fwd():
            net.eval()
            with torch.no_grad():
                net.forward_packed(x, bi, n_bags)
            sync()

        def fwd_bwd():
            net.train()
            out = net.forward_packed(x, bi, n_bags)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], labels)
            loss = loss + sum(net.training_loss_terms(out, x, bi, labels).values())
            loss.backward()
            net.zero_grad(set_to_none=True)
            sync()

        times = {}
        for key, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            fn()
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                runs.append(1000 * (time.perf_counter() - t))
            times[key] = statistics.median(runs)
        rows.append({"network": name, "params": params, **times})
        print(f"{name:16s} {params:10,d} {times['fwd']:12.1f} {times['fwd_bwd']:11.1f}", flush=True)
    return rows


if __name__ == "__main__":
    import fire

    fire.Fire(benchmark)
