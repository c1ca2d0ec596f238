"""Classic MIL benchmark (MUSK1/MUSK2 ``.npz``) with the protocol of Ilse et al. 2018.

    python -m scripts.benchmarks.mil --data ../shared/data/mil/musk1.npz --method smile \\
        --folds 10 --repeats 5 --out result.json [--factor 1.0] [--embed_dim 256 ...]

Protocol: ``repeats`` x ``folds``-fold cross-validation (stratified; each bag is its own "patient");
inside each training fold 10% of the bags (stratified) are held out for early stopping on the
validation loss and the best epoch's weights are kept. Optimiser as Ilse et al.: Adam lr 5e-4, weight
decay 5e-4, betas (0.9, 0.999), at most 200 epochs, patience 20. Bags are packed ``batch_size`` at a time
(default 8), so BatchNorm of the SMILE embedding sees the instances of 8 bags. Accuracy is at probability 0.5.

Reported (printed and written as JSON): ``accuracy_mean`` and ``accuracy_sem`` (mean and standard
error over the repeats of each repeat's out-of-fold accuracy), ``accuracy_sem_folds`` (standard
error over all folds), ``auc_mean`` / ``auc_sem`` (out-of-fold AUC per repeat), and the per-fold values.
Any keyword the network accepts can be passed (``--factor 1.0`` makes SMILE gated attention MIL).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np

from scripts.io_utils import write_json
from scripts.metrics import auc, threshold_metrics
from scripts.mil_data import bags_from_npz
from scripts.splits import make_splits


def run_benchmark(
    data: str,
    method: str = "smile",
    folds: int = 10,
    repeats: int = 5,
    epochs: int = 200,
    lr: float = 5e-4,
    weight_decay: float = 5e-4,
    batch_size: int = 8,
    patience: int = 20,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_threads: int | None = 1,
    progress: bool = True,
    **network_kwargs,
) -> dict:
    """Run the benchmark and return the result dict (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from scripts.networks import build_mil_network
    from scripts.training import TrainSettings, run_cross_validation

    bags = bags_from_npz(data)
    factory = functools.partial(build_mil_network, method, **network_kwargs)

    def adam(model):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), foreach=True)

    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, optimizer=adam, monitor="loss", patience=patience,
        device="cpu", progress=False, num_threads=num_threads, eval_batch_size=64,
    )  # fmt: skip
    start = time.perf_counter()
    repeat_acc, repeat_auc, fold_acc, fold_auc, epochs_run = [], [], [], [], []
    bar = tqdm(total=folds * repeats, desc=f"{Path(data).stem} {method}", unit="fold", disable=not progress)
    for r in range(repeats):
        splits = make_splits(bags, n_folds=folds, val_fraction=val_fraction, seed=seed + r)
        for fold in splits["folds"]:
            one = {**splits, "folds": [fold]}
            settings.seed = seed + 100 * r
            result = run_cross_validation(factory, bags, one, settings, output_dir=None, n_bootstrap=0, keep_models=False)
            rows = result.predictions
            labels = [p["label"] for p in rows]
            probs = [p["prob"] for p in rows]
            fold_acc.append(threshold_metrics(labels, probs, 0.5)["accuracy"])
            fold_auc.append(auc(labels, probs))
            epochs_run.append(result.histories[0]["best_epoch"])
            if fold["fold"] == 0:
                repeat_rows = []
            repeat_rows.extend(rows)
            bar.update(1)
            bar.set_postfix_str(f"acc {np.mean(fold_acc):.3f}")
        labels = [p["label"] for p in repeat_rows]
        probs = [p["prob"] for p in repeat_rows]
        repeat_acc.append(threshold_metrics(labels, probs, 0.5)["accuracy"])
        repeat_auc.append(auc(labels, probs))
    bar.close()
    result = {
        "data": str(data),
        "method": method,
        "network_kwargs": network_kwargs,
        "folds": folds,
        "repeats": repeats,
        "n_bags": len(bags),
        "feature_dim": int(bags[0].features.shape[1]),
        "accuracy_mean": float(np.mean(repeat_acc)),
        "accuracy_sem": _sem(repeat_acc),
        "accuracy_sem_folds": _sem(fold_acc),
        "auc_mean": float(np.nanmean(repeat_auc)),
        "auc_sem": _sem(repeat_auc),
        "accuracy_per_repeat": repeat_acc,
        "auc_per_repeat": repeat_auc,
        "accuracy_per_fold": fold_acc,
        "best_epoch_median": float(np.median(epochs_run)),
        "settings": {
            "optimizer": "Adam", "lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "epochs": epochs,
            "early_stopping": f"validation loss, patience {patience}, {val_fraction:.0%} of each training fold",
            "batch_size": batch_size, "seed": seed, "num_threads": num_threads,
        },  # fmt: skip
        "seconds": time.perf_counter() - start,
    }
    return result


def _sem(values) -> float:
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def main(data: str, method: str = "smile", folds: int = 10, repeats: int = 5, out: str | None = None, **kwargs) -> None:
    """CLI: run, print a summary line and the JSON, write ``out``."""
    result = run_benchmark(data, method=method, folds=folds, repeats=repeats, **kwargs)
    print(
        f"{Path(data).stem} {method} {result['network_kwargs'] or ''}: accuracy {result['accuracy_mean']:.3f} "
        f"+- {result['accuracy_sem']:.3f} (SEM over {repeats} repeats), AUC {result['auc_mean']:.3f}, "
        f"{result['seconds']:.0f} s"
    )
    summary = {k: v for k, v in result.items() if k not in ("accuracy_per_fold",)}
    print(json.dumps(summary, indent=2))
    if out:
        write_json(out, result)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
