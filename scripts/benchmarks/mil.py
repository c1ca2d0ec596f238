"""Classic MIL benchmark (MUSK1/MUSK2 ``.npz``), protocol and network after Ilse et al. 2018.

    python -m scripts.benchmarks.mil --data ../shared/data/mil/musk1.npz --method smile \\
        --folds 10 --repeats 5 --out result.json [--factor 1.0] [--val_fraction 0.1 --patience 20 ...]

Default protocol: ``repeats`` x ``folds``-fold cross-validation (stratified; each bag is its own
"patient"; repeat ``r`` uses split seed ``seed + r``). Per fold the features are standardised with the
mean and standard deviation of the training fold's instances only (``--standardize``). The network is
trained on the whole training fold for a fixed ``epochs`` (100) with Adam lr 5e-4, weight decay 5e-4,
betas (0.9, 0.999), ``batch_size`` (8) bags packed per step, and the last epoch is tested; nothing is
selected on the test fold. ``--val_fraction 0.1`` instead holds out 10% of each training fold
(stratified) for early stopping on the validation loss (``patience``) and keeps the best epoch; with
MUSK's 8-10 validation bags that stopped after a handful of epochs and scored lower (docs/benchmarks.md).

Network (``--arch ilse``, the default for ``--method smile``): SMILE with the embedding of Ilse et al.'s
MUSK network, fc-256, fc-128, fc-64 with ReLU and dropout 0.25 after each, no input BatchNorm (the
inputs are standardised instead), gated attention with hidden size 64 followed by SMILE's damping
(``threshold``/``factor``; ``--factor 1.0`` = gated attention MIL), one logit with BCE. ``--arch default``
uses the network's own defaults (SMILE: BatchNorm1d -> Linear 256, attention 128); any keyword the
network accepts can be passed and overrides the arch's values. Accuracy is at probability 0.5.

The floor (``--floor true``, the default): mean + max pooled instance features with a scikit-learn
logistic regression (:mod:`scripts.experiments.pooled_baseline`), fitted on the same training bags of the same
folds and tested on the same test bags; its accuracy and AUC are reported beside the network's, with a
paired bootstrap of the AUC difference (network - floor) over the out-of-fold predictions of all
repeats, resampling bags (each bag carries its predictions of every repeat).

Reported (printed and written as JSON): ``accuracy_mean`` and ``accuracy_sem`` (mean and standard
error over the repeats of each repeat's out-of-fold accuracy), ``accuracy_sem_folds`` (standard
error over all folds), ``auc_mean`` / ``auc_sem`` (out-of-fold AUC per repeat), and the per-repeat and
per-fold values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scripts.data.bags import Bag, bags_from_npz
from scripts.data.splits import make_splits
from scripts.experiments.pooled_baseline import DESCRIPTION as FLOOR_DESCRIPTION
from scripts.experiments.pooled_baseline import fit_pooled, predict_pooled
from scripts.metrics import auc, threshold_metrics
from scripts.metrics.paired import paired_bootstrap_auc
from scripts.networks import build_mil_network
from scripts.utils.io_utils import write_json
from scripts.workflows.training import TrainSettings, run_cross_validation

# Ilse et al. 2018's MUSK network (appendix): fc-256, fc-128, fc-64 (ReLU), attention with hidden 64,
# as SMILE options; the inputs are standardised per fold instead of SMILE's input BatchNorm.
ILSE_MUSK_SMILE = {
    "hidden_dims": [256, 128], "embed_dim": 64, "attention_dim": 64, "input_norm": "none", "embed_dropout": 0.25,
}


def run_benchmark(
    data: str,
    method: str = "smile",
    folds: int = 10,
    repeats: int = 5,
    epochs: int = 100,
    lr: float = 5e-4,
    weight_decay: float = 5e-4,
    batch_size: int = 8,
    patience: int = 20,
    val_fraction: float = 0.0,
    seed: int = 0,
    num_threads: int | None = 1,
    progress: bool = True,
    standardize: bool = True,
    arch: str | None = None,
    floor: bool = True,
    **network_kwargs,
) -> dict:
    """Run the benchmark and return the result dict (see the module docstring)."""
    bags = bags_from_npz(data)
    arch = arch or ("ilse" if method == "smile" else "default")
    if arch == "ilse":
        if method != "smile":
            raise ValueError(f"--arch ilse sets SMILE's embedding options; use --arch default with --method {method}")
        network_kwargs = {**ILSE_MUSK_SMILE, **network_kwargs}
    elif arch != "default":
        raise ValueError(f"arch must be 'ilse' or 'default', got {arch!r}")
    factory = functools.partial(build_mil_network, method, **network_kwargs)

    def adam(model):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), foreach=True)

    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, optimizer=adam, monitor="loss", patience=patience,
        device="cpu", num_threads=num_threads, eval_batch_size=64,
    )  # fmt: skip
    start = time.perf_counter()
    repeat_acc, repeat_auc, fold_acc, fold_auc, epochs_run = [], [], [], [], []
    floor_acc, floor_auc, all_rows = [], [], []
    bar = tqdm(total=folds * repeats, desc=f"{Path(data).stem} {method}", unit="fold", disable=not progress)
    for r in range(repeats):
        # the test folds depend only on the seed, not on val_fraction; 0 = train on the whole training fold
        splits = make_splits(bags, n_folds=folds, val_fraction=val_fraction or 0.1, seed=seed + r)
        for fold in splits["folds"]:
            if not val_fraction:
                fold = {**fold, "train": fold["train"] + fold["val"], "val": []}
            fold_bags = standardized(bags, fold["train"]) if standardize else bags
            one = {**splits, "folds": [fold]}
            settings.seed = seed + 100 * r
            result = run_cross_validation(factory, fold_bags, one, settings, output_dir=None, n_bootstrap=0, keep_models=False)
            rows = result.predictions
            if floor:
                by_id = {b.bag_id: b for b in bags}
                model = fit_pooled([by_id[s] for s in fold["train"] + fold["val"]])
                floor_probs = predict_pooled(model, [by_id[r["slide_id"]] for r in rows])
                rows = [{**row, "floor_prob": float(q), "repeat": r} for row, q in zip(rows, floor_probs)]
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
        if floor:
            floor_probs = [p["floor_prob"] for p in repeat_rows]
            floor_acc.append(threshold_metrics(labels, floor_probs, 0.5)["accuracy"])
            floor_auc.append(auc(labels, floor_probs))
            all_rows.extend(repeat_rows)
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
            "early_stopping": (f"validation loss, patience {patience}, {val_fraction:.0%} of each training fold"
                               if val_fraction else "none: fixed epochs on the whole training fold, last epoch tested"),
            "standardize": bool(standardize), "arch": arch,
            "batch_size": batch_size, "seed": seed, "num_threads": num_threads,
        },  # fmt: skip
        "seconds": time.perf_counter() - start,
    }
    if floor:
        result["floor"] = _floor_summary(all_rows, floor_acc, floor_auc, repeat_acc, seed)
    return result


def _floor_summary(rows, floor_acc, floor_auc, repeat_acc, seed) -> dict:
    labels = [r["label"] for r in rows]
    test = paired_bootstrap_auc(labels, [r["prob"] for r in rows], [r["floor_prob"] for r in rows],
                                groups=[r["slide_id"] for r in rows], n_bootstrap=2000, seed=seed)  # fmt: skip
    return {
        "method": FLOOR_DESCRIPTION,
        "accuracy_mean": float(np.mean(floor_acc)),
        "accuracy_sem": _sem(floor_acc),
        "auc_mean": float(np.nanmean(floor_auc)),
        "auc_sem": _sem(floor_auc),
        "accuracy_per_repeat": floor_acc,
        "auc_per_repeat": floor_auc,
        "accuracy_difference_mean": float(np.mean(np.subtract(repeat_acc, floor_acc))),
        "paired_bootstrap": {
            "what": "AUC(network) - AUC(floor) over the out-of-fold predictions of all repeats; bags resampled with "
                    "all their repeats (2000 resamples, percentile 95% interval)",
            "auc_network": test.auc_a, "auc_floor": test.auc_b, "difference": test.difference,
            "ci": [test.ci_low, test.ci_high], "p_value": test.p_value,
        },
    }  # fmt: skip


def standardized(bags: list[Bag], train_ids) -> list[Bag]:
    """Copies of ``bags`` whose features are standardised with the mean and standard deviation of the
    instances of the training bags ``train_ids`` only (the test and validation bags are never looked at)."""
    train_ids = set(train_ids)
    x = torch.cat([b.features for b in bags if b.bag_id in train_ids])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    return [dataclasses.replace(b, features=(b.features - mean) / std) for b in bags]


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
    if "floor" in result:
        f, t = result["floor"], result["floor"]["paired_bootstrap"]
        print(
            f"{Path(data).stem} floor ({f['method']}): accuracy {f['accuracy_mean']:.3f} +- {f['accuracy_sem']:.3f}, "
            f"AUC {f['auc_mean']:.3f}; AUC {method} - floor {t['difference']:+.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] "
            f"(paired bootstrap over bags, p {t['p_value']:.3f})"
        )
    summary = {k: v for k, v in result.items() if k not in ("accuracy_per_fold",)}
    print(json.dumps(summary, indent=2))
    if out:
        write_json(out, result)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
