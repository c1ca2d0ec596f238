"""SMILE's threshold x factor ablation (the paper's Table 2 grid) on the comparison's splits.

    python -m monai.bundle run ablation --config_file "['configs/train.json','configs/compare.json']" --datalist <csv> --output_dir <out>

For every (threshold, factor) of the grid (default threshold {0.4, ..., 0.8} x factor {0.3, ..., 0.8})
SMILE is cross-validated on the same ``<out>/splits.json`` folds, every fold trained by ``train.json``'s
``train`` / ``validate`` sections with all their handlers (:func:`scripts.workflows.training.config_cross_validation`;
the cell is the config overrides ``network_def#threshold`` and ``network_def#factor``).
Outputs under ``<out>/ablation/``: ``ablation.csv`` (threshold, factor, fold AUC mean and standard
deviation, pooled out-of-fold AUC and its 95 % interval, accuracy, F1), ``ablation.json``,
``oof_predictions.csv`` (every cell's out-of-fold probabilities, long form) and ``ablation.png`` (heat
maps of the mean fold AUC and of the pooled AUC). No fold models are kept (each fold's folder, where the
config's handlers write, is a temporary one; a handler writing elsewhere, e.g. MLflow with
``--tracking mlflow``, keeps its records: run names ``threshold<t>_factor<f>/fold<k>``).

Choosing the best cell uses validation data only: every cell's score is the mean over folds of the
validation AUC of the selected epoch (ties: lower mean validation loss); the test folds never take part
in the choice. ``ablation.json`` reports that choice (``chosen_on_validation``) with its held-out
(test-fold) results, which is the number to quote; picking the cell with the best test AUC would
report the maximum of many noisy estimates.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from scripts.formats.layout import OutputLayout
from scripts.metrics import nan_to_none
from scripts.networks.methods import method_config_overrides
from scripts.utils.io_utils import atomic_path, write_csv, write_json
from scripts.workflows.training import config_cross_validation, config_parser_for, training_description

logger = logging.getLogger(__name__)

PAPER_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)
PAPER_FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def run_ablation(
    bags,
    splits: dict,
    output_dir: str | Path,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    factors: Sequence[float] = PAPER_FACTORS,
    method: str = "smile",
    method_kwargs: Mapping[str, Any] | None = None,
    n_bootstrap: int = 2000,
    parser=None,
) -> list[dict]:
    """Cross-validate ``method`` at every (threshold, factor); write ``<output_dir>/ablation/``; return the rows.

    ``parser``: the training config (default: the ``monai.bundle`` config being run; from Python e.g.
    :func:`scripts.workflows.training.training_parser`)."""
    parser = config_parser_for(parser, output_dir, "run_ablation")
    thresholds = [float(t) for t in thresholds]
    factors = [float(f) for f in factors]
    if not thresholds or not factors:
        raise ValueError("the ablation grid is empty; give --thresholds and --factors lists")
    base = dict(method_kwargs or {})
    base.pop("threshold", None)
    base.pop("factor", None)
    out_dir = OutputLayout(output_dir).ablation_dir
    rows, long_rows = [], []
    grid = list(itertools.product(thresholds, factors))
    bar = tqdm(grid, desc=f"{method} threshold x factor", unit="cell", dynamic_ncols=True)
    for threshold, factor in bar:
        bar.set_postfix_str(f"threshold {threshold:g} factor {factor:g}")
        start = time.perf_counter()
        overrides = method_config_overrides(method, {**base, "threshold": threshold, "factor": factor}, parser.get("network_def"))
        result = config_cross_validation(bags, splits, output_dir=None, n_bootstrap=n_bootstrap, parser=parser,
                                         overrides=overrides, run_prefix=f"threshold{threshold:g}_factor{factor:g}/")
        summary = result.summary
        pooled = summary["pooled"]
        at_val = pooled.get("at_val_threshold") or {}
        ci = pooled.get("auc_ci") or [None, None]
        val_auc, val_loss = _fold_mean(summary["folds"], "val_auc"), _fold_mean(summary["folds"], "val_loss")
        rows.append(
            {
                "threshold": threshold,
                "factor": factor,
                "val_auc_mean": val_auc,
                "val_loss_mean": val_loss,
                "auc_mean": summary["mean"]["auc"],
                "auc_std": summary["std"]["auc"],
                "pooled_auc": pooled["auc"],
                "pooled_auc_ci_low": ci[0],
                "pooled_auc_ci_high": ci[1],
                "ci_method": pooled.get("ci_method"),
                "accuracy": at_val.get("accuracy"),
                "f1": at_val.get("f1"),
                "n_slides": summary["n_slides"],
                "n_folds": len(summary["folds"]),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        long_rows.extend({"threshold": threshold, "factor": factor, **p} for p in result.predictions)
    bar.close()
    rows = nan_to_none(rows)
    write_csv(out_dir / "ablation.csv", rows)
    write_csv(out_dir / "oof_predictions.csv", long_rows)
    best = choose_on_validation(rows)
    write_json(
        out_dir / "ablation.json",
        {"method": method, "method_kwargs": base, "thresholds": thresholds, "factors": factors, "rows": rows,
         "chosen_on_validation": best, "selection_rule": SELECTION_RULE,
         "settings": {k: v for k, v in training_description(parser).items() if k != "network_def"},
         "n_folds": len(splits["folds"])},
    )  # fmt: skip
    plot_ablation(rows, thresholds, factors, out_dir / "ablation.png", title=method)
    logger.info(
        "ablation: chosen on validation (mean fold val AUC %s) threshold %g, factor %g; its held-out result: mean fold "
        "AUC %s, pooled AUC %s; results in %s", _f3(best["val_auc_mean"]), best["threshold"], best["factor"],
        _f3(best["auc_mean"]), _f3(best["pooled_auc"]), out_dir,
    )  # fmt: skip
    return rows


SELECTION_RULE = "highest mean over folds of the validation AUC (selected epoch); ties: lowest mean validation loss"


def choose_on_validation(rows: Sequence[dict]) -> dict:
    """The grid cell with the best validation score (``SELECTION_RULE``); test-fold values are not read."""
    if not rows:
        raise ValueError("no ablation rows to choose from")

    def key(r):
        auc = r.get("val_auc_mean")
        loss = r.get("val_loss_mean")
        return (-1.0 if auc is None else auc, -(math.inf if loss is None else loss))

    return max(rows, key=key)


def _fold_mean(folds: Sequence[dict], key: str):
    values = [float(f[key]) for f in folds if f.get(key) is not None and math.isfinite(float(f[key]))]
    return float(np.mean(values)) if values else None


def _f3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ablation_matrix(rows: Sequence[dict], thresholds: Sequence[float], factors: Sequence[float], key: str) -> np.ndarray:
    """(len(thresholds), len(factors)) array of ``key`` (NaN where missing)."""
    values = np.full((len(thresholds), len(factors)), np.nan)
    for r in rows:
        i = thresholds.index(r["threshold"])
        j = factors.index(r["factor"])
        values[i, j] = np.nan if r.get(key) is None else float(r[key])
    return values


def plot_ablation(rows, thresholds, factors, path, title: str = "smile") -> None:
    """Two annotated heat maps (rows threshold, columns factor): mean fold AUC (± std) and pooled AUC."""
    mean = ablation_matrix(rows, thresholds, factors, "auc_mean")
    std = ablation_matrix(rows, thresholds, factors, "auc_std")
    pooled = ablation_matrix(rows, thresholds, factors, "pooled_auc")
    finite = np.concatenate([mean[np.isfinite(mean)], pooled[np.isfinite(pooled)]])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    width = 2.2 + 0.9 * len(factors)
    fig = Figure(figsize=(2 * width, 1.6 + 0.6 * len(thresholds)), dpi=100)
    axes = fig.subplots(1, 2)
    for ax, values, name in ((axes[0], mean, "mean fold AUC (± std)"), (axes[1], pooled, "pooled out-of-fold AUC")):
        image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(factors)), [f"{f:g}" for f in factors])
        ax.set_yticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
        ax.set_xlabel("factor")
        ax.set_ylabel("threshold")
        ax.set_title(f"{title}: {name}", fontsize=10)
        for i, j in itertools.product(range(len(thresholds)), range(len(factors))):
            v = values[i, j]
            text = "n/a" if not math.isfinite(v) else f"{v:.3f}"
            if values is mean and math.isfinite(std[i, j]):
                text += f"\n±{std[i, j]:.3f}"
            shade = (v - vmin) / (vmax - vmin) if math.isfinite(v) else 0.0
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if shade > 0.6 else "white")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


__all__ = ["PAPER_THRESHOLDS", "PAPER_FACTORS", "SELECTION_RULE", "run_ablation", "choose_on_validation", "ablation_matrix",
           "plot_ablation"]
