"""Cross-centre transfer: train on one centre, test on every other centre.

    python -m monai.bundle run transfer --config_file "['configs/train.json','configs/compare.json']" --datalist <csv> --output_dir <out>

For each training centre (the datalist's ``center`` column) and each method of ``transfer_methods``:
the centre's slides are split by patient (stratified) into training and validation parts; the model is
trained on the first and its epoch selected on the second (the test centres are never looked at), then
every other centre is predicted. Every model, the diagonal's fold models too, is trained by
``train.json``'s ``train`` / ``validate`` sections with all their handlers
(:func:`scripts.workflows.training.train_from_config`; the method is a config override, the run name
``<method>/<centre>``, the folder a temporary one: no models are kept). The diagonal is the centre's own patient-level cross-validation
(pooled out-of-fold AUC, ``transfer_diagonal="cv"``) or ``n/a`` (``"none"``); an ``other centres``
column scores all other centres together.

Outputs under ``<out>/transfer/``: ``transfer.csv`` (one row per method and training centre, one AUC
column per test centre: the matrix), ``transfer_long.csv`` (every cell with the numbers of slides and
positives, the AUC's 95 % bootstrap interval, accuracy at the validation threshold, or why it is n/a),
``predictions.csv`` (every test slide's probability) and ``transfer.png`` (one heat map per method).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from scripts.data.bags import Bag
from scripts.data.feature_norm import check_feature_norm, fit_feature_norm, standardize_bags
from scripts.data.splits import SplitError, make_splits
from scripts.formats.layout import OutputLayout
from scripts.metrics import classification_report, nan_to_none, youden_threshold
from scripts.networks.methods import method_config_overrides, resolve_methods
from scripts.utils.errors import BundleError
from scripts.utils.io_utils import atomic_path, write_csv, write_json
from scripts.workflows.training import config_cross_validation, config_parser_for, predict, train_from_config, training_description

logger = logging.getLogger(__name__)

OTHERS = "other centres"


class TransferError(BundleError, ValueError):
    """A cohort that cannot be used for a cross-centre analysis (the message says why)."""


def holdout_split(bags: Sequence[Bag], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Bag], list[Bag]]:
    """(train, val) of one centre's bags: patient-grouped, label-stratified, about ``val_fraction`` in val."""
    labels = np.array([int(b.label) for b in bags])
    groups = np.array([b.patient_id for b in bags])
    n_patients = len(set(groups.tolist()))
    if n_patients < 2:
        raise TransferError(f"{n_patients} patient(s): cannot hold out a validation patient")
    largest_class = int(np.bincount(labels).max())
    n_splits = min(max(2, int(round(1.0 / val_fraction))), n_patients, max(2, largest_class))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected here
        warnings.simplefilter("ignore", UserWarning)
        train, val = next(splitter.split(np.zeros(len(bags)), labels, groups))
    return [bags[i] for i in train], [bags[i] for i in val]


def run_transfer(
    bags: Sequence[Bag],
    output_dir: str | Path,
    methods: Sequence[str] = ("smile",),
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    val_fraction: float = 0.2,
    diagonal: str = "cv",
    cv_folds: int = 3,
    seed: int = 0,
    n_bootstrap: int = 2000,
    parser=None,
) -> list[dict]:
    """Train on each centre, test on the others; write ``<output_dir>/transfer/``; return the matrix rows.

    ``seed`` makes the centres' train/validation splits; the models are seeded by the config's ``seed``.
    ``parser``: the training config (default: the ``monai.bundle`` config being run; from Python e.g.
    :func:`scripts.workflows.training.training_parser`)."""
    parser = config_parser_for(parser, output_dir, "run_transfer")
    if diagonal not in ("cv", "none"):
        raise ValueError(f"transfer_diagonal must be 'cv' or 'none'; got {diagonal!r}")
    methods = resolve_methods(methods)
    method_kwargs = dict(method_kwargs or {})
    centers = sorted({b.center for b in bags if b.center})
    if len(centers) < 2:
        raise TransferError(
            f"cross-centre transfer needs at least 2 centres in the datalist's 'center' column; found {centers or 'none'}"
            " (a classic MIL .npz has no centres)"
        )
    missing = [b.bag_id for b in bags if not b.center]
    if missing:
        logger.warning("%d slide(s) have no centre and are left out of the transfer analysis: %s", len(missing), ", ".join(missing[:10]))
    by_center = {c: [b for b in bags if b.center == c] for c in centers}
    shared = shared_patients(by_center)
    if shared:
        logger.warning("transfer: %d patient(s) have slides in more than one centre (e.g. %s); a model trained on one of "
                       "their centres scores them in-sample in the others", len(shared), ", ".join(shared[:5]))  # fmt: skip
    out_dir = OutputLayout(output_dir).transfer_dir
    feature_norm = check_feature_norm(parser.get("feature_norm", "none"))
    train_seed = int(parser.get_parsed_content("seed"))
    batch_size = int(parser.get_parsed_content("batch_size"))
    matrix_rows, long_rows, prediction_rows = [], [], []
    jobs = [(m, c) for m in methods for c in centers]
    bar = tqdm(jobs, desc="train centre", unit="model", dynamic_ncols=True)
    for method, train_center in bar:
        bar.set_postfix_str(f"{method} on {train_center}")
        kwargs = dict(method_kwargs.get(method) or {})
        overrides = method_config_overrides(method, kwargs, parser.get("network_def"))
        own = by_center[train_center]
        row: dict[str, Any] = {"method": method, "train_center": train_center, "n_train": 0, "n_val": 0}
        start = time.perf_counter()
        try:
            if len({b.label for b in own}) < 2:
                raise TransferError(f"centre {train_center} has slides of one class only")
            train, val = holdout_split(own, val_fraction, seed)
            row["n_train"], row["n_val"] = len(train), len(val)
            norm = fit_feature_norm(feature_norm, train)  # the training centre's train bags
            train, val = standardize_bags(norm, train, val)
            model, history = train_from_config(parser, train, val, None, train_seed, run_name=f"{method}/{train_center}",
                                               bags=bags, overrides=overrides)
            val_probs = predict(model, val, batch_size) if val else []
            threshold = youden_threshold([b.label for b in val], val_probs) if val else 0.5
        except (TransferError, ValueError) as error:
            reason = str(error)
            logger.warning("transfer: cannot train %s on %s: %s", method, train_center, reason)
            for test_center in centers + [OTHERS]:
                row[test_center] = None
                long_rows.append({"method": method, "train_center": train_center, "test_center": test_center, "auc": None, "note": reason})
            matrix_rows.append(row)
            continue
        others: list[tuple[Bag, float]] = []
        for test_center in centers:
            if test_center == train_center:
                cell = _diagonal(diagonal, parser, overrides, own, cv_folds, val_fraction, seed, n_bootstrap,
                                 run_prefix=f"{method}/{train_center}/cv/")
            else:
                test = by_center[test_center]
                (scored,) = standardize_bags(norm, test)
                probs = predict(model, scored, batch_size)
                others.extend(zip(test, probs))
                prediction_rows.extend(
                    {"method": method, "train_center": train_center, "test_center": test_center, "slide_id": b.bag_id,
                     "patient_id": b.patient_id, "label": b.label, "prob": float(p), "threshold": threshold}
                    for b, p in zip(test, probs)
                )  # fmt: skip
                cell = _score([b.label for b in test], probs, threshold, n_bootstrap, [b.patient_id for b in test])
            row[test_center] = cell["auc"]
            long_rows.append({"method": method, "train_center": train_center, "test_center": test_center, **cell})
        cell = _score([b.label for b, _ in others], [p for _, p in others], threshold, n_bootstrap,
                      [b.patient_id for b, _ in others]) if others else {"auc": None, "note": "no other centre"}
        row[OTHERS] = cell["auc"]
        long_rows.append({"method": method, "train_center": train_center, "test_center": OTHERS, **cell})
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["best_epoch"] = history["best_epoch"]
        matrix_rows.append(row)
    bar.close()
    matrix_rows, long_rows = nan_to_none(matrix_rows), nan_to_none(long_rows)
    columns = ["method", "train_center", *centers, OTHERS, "n_train", "n_val", "best_epoch", "seconds"]
    write_csv(out_dir / "transfer.csv", matrix_rows, fieldnames=columns)
    write_csv(out_dir / "transfer_long.csv", long_rows)
    write_csv(out_dir / "predictions.csv", prediction_rows)
    write_json(out_dir / "transfer.json", {"centers": centers, "methods": methods, "diagonal": diagonal, "rows": matrix_rows,
                                           "cells": long_rows,
                                           "settings": {k: v for k, v in training_description(parser).items()
                                                        if k != "network_def"}})  # fmt: skip
    plot_transfer(matrix_rows, centers, methods, out_dir / "transfer.png", diagonal)
    logger.info("transfer matrix written to %s", out_dir / "transfer.csv")
    return matrix_rows


def shared_patients(by_center: dict) -> list[str]:
    """Patients with slides in more than one centre (cross-centre scores of them are not held out)."""
    seen: dict[str, set] = {}
    for center, bags in by_center.items():
        for b in bags:
            seen.setdefault(str(b.patient_id), set()).add(center)
    return sorted(p for p, centers in seen.items() if len(centers) > 1)


def _score(labels, probs, threshold: float, n_bootstrap: int, patients=None) -> dict:
    labels = [int(x) for x in labels]
    report = classification_report(labels, probs, threshold, n_boot=n_bootstrap, seed=0, groups=patients)
    note = "" if math.isfinite(report["auc"]) else "one class only: AUC undefined"
    ci = report["auc_ci"]
    return {
        "auc": report["auc"], "auc_ci_low": ci[0], "auc_ci_high": ci[1], "ci_method": report["ci_method"], "n": report["n"], "n_positive": report["n_positive"],
        "accuracy": report["at_val_threshold"]["accuracy"], "f1": report["at_val_threshold"]["f1"], "note": note,
    }  # fmt: skip


def _diagonal(diagonal, parser, overrides, own, cv_folds, val_fraction, seed, n_bootstrap, run_prefix="") -> dict:
    """The training centre's own patient-level cross-validation (pooled out-of-fold), each fold trained by
    the config (:func:`scripts.workflows.training.config_cross_validation`, with the run's feature standardisation)."""
    if diagonal == "none":
        return {"auc": None, "n": len(own), "note": "n/a (within-centre; transfer_diagonal=none)"}
    n_patients = len({b.patient_id for b in own})
    folds = min(int(cv_folds), n_patients)
    splits = None
    # a small centre may not fill a 1/val_fraction inner split of each class: retry with a third held out
    for fraction in dict.fromkeys([val_fraction, 0.34]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                splits = make_splits(own, n_folds=folds, val_fraction=fraction, seed=seed)
            break
        except (SplitError, ValueError) as error:
            reason = str(error).splitlines()[0]
    if splits is None:
        return {"auc": None, "n": len(own), "note": f"n/a: within-centre CV impossible ({reason})"}
    result = config_cross_validation(own, splits, output_dir=None, n_bootstrap=n_bootstrap, parser=parser,
                                     overrides=overrides, run_prefix=run_prefix)
    pooled = result.summary["pooled"]
    ci = pooled.get("auc_ci") or [None, None]
    return {
        "auc": pooled["auc"], "auc_ci_low": ci[0], "auc_ci_high": ci[1], "ci_method": pooled.get("ci_method"), "n": pooled["n"], "n_positive": pooled["n_positive"],
        "accuracy": (pooled.get("at_val_threshold") or {}).get("accuracy"), "f1": (pooled.get("at_val_threshold") or {}).get("f1"),
        "note": f"within-centre {folds}-fold CV, pooled out-of-fold",
    }  # fmt: skip


def plot_transfer(rows: Sequence[dict], centers: Sequence[str], methods: Sequence[str], path, diagonal: str) -> None:
    """One annotated heat map per method: rows training centre, columns test centre (+ other centres)."""
    cols = list(centers) + [OTHERS]
    fig = Figure(figsize=(1.6 + 1.3 * len(cols) * len(methods) + 1.0 * len(methods), 1.4 + 0.7 * len(centers)), dpi=100)
    axes = fig.subplots(1, len(methods), squeeze=False)
    for ax, method in zip(axes[0], methods):
        values = np.full((len(centers), len(cols)), np.nan)
        for r in rows:
            if r["method"] != method:
                continue
            i = centers.index(r["train_center"])
            for j, c in enumerate(cols):
                values[i, j] = np.nan if r.get(c) is None else float(r[c])
        image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(centers)), centers)
        ax.set_xlabel("test centre")
        ax.set_ylabel("training centre")
        ax.set_title(f"{method}: AUC" + (" (diagonal: within-centre CV)" if diagonal == "cv" else ""), fontsize=9)
        for i in range(len(centers)):
            for j in range(len(cols)):
                v = values[i, j]
                ax.text(j, i, "n/a" if not math.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if math.isfinite(v) and v > 0.6 else "white")  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


__all__ = ["TransferError", "holdout_split", "run_transfer", "plot_transfer"]
