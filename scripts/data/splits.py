"""Patient-level cross-validation splits (no patient in two folds), saved as JSON and reusable.

``splits.json``::

    {"n_folds": 5, "seed": 0, "val_fraction": 0.2, "grouped_by": "patient_id",
     "stratification": "label, patient-grouped; validation holds both classes when possible",
     "folds": [{"fold": 0, "train": [slide ids], "val": [...], "test": [...]}, ...]}

The test folds come from ``StratifiedGroupKFold`` (stratified by label, grouped by patient); inside
each fold's training part a validation split (also stratified by label and grouped by patient) is held
out for early stopping, checkpoint selection and the operating threshold. Of the inner patient-grouped
splits the first one whose validation *and* training parts both hold the two classes is used (a small
cohort or centre can make the first inner split one-class); when none does, training warns about the
fallback (selection on validation loss, threshold 0.5) and the summary counts such folds.

The settings a file was made with (``n_folds``, ``seed``, ``val_fraction``, ``stratification``) are
stored in it. An ``<output_dir>/splits.json`` left by an earlier run is reused only when they match
the requested settings (and the slides match); otherwise new splits are made and a warning names the
difference. A splits file given explicitly (``splits_file``) that records different settings is an
error (:class:`SplitError`) naming the difference. A user-supplied file with the same layout is checked
(every slide known, no patient shared between train/val/test of one fold) and used.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from scripts.data.bags import Bag
from scripts.formats.layout import OutputLayout
from scripts.utils.distributed import is_main_process
from scripts.utils.errors import BundleError
from scripts.utils.io_utils import write_json

logger = logging.getLogger(__name__)

STRATIFICATION = "label, patient-grouped; validation holds both classes when possible"


class SplitError(BundleError, ValueError):
    """Splits that cannot be made or used; the message says why and what to change."""


def make_splits(bags: Sequence[Bag], n_folds: int = 5, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Patient-grouped, label-stratified ``n_folds`` test folds, each with a validation split."""
    ids, labels, groups = _arrays(bags)
    n_patients = len(set(groups))
    if n_folds < 2:
        raise SplitError(f"n_folds must be at least 2, got {n_folds}")
    if n_patients < n_folds:
        raise SplitError(f"{n_patients} patient(s) cannot fill {n_folds} folds; use fewer folds or more data")
    if len(set(labels.tolist())) < 2:
        raise SplitError("all slides have the same label; cross-validation needs both classes")
    if not 0.0 < val_fraction < 0.5:
        raise SplitError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (train_val, test) in enumerate(outer.split(ids, labels, groups)):
        train, val = _validation_split(train_val, labels, groups, val_fraction, seed + 1000 + k)
        folds.append({"fold": k, "train": ids[train].tolist(), "val": ids[val].tolist(), "test": ids[test].tolist()})
    splits = {"n_folds": n_folds, "seed": seed, "val_fraction": val_fraction, "grouped_by": "patient_id",
              "stratification": STRATIFICATION, "folds": folds}  # fmt: skip
    check_splits(splits, bags)
    return splits


def _validation_split(indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    n_splits = max(2, int(round(1.0 / fraction)))
    sub_groups = groups[indices]
    n_splits = min(n_splits, len(set(sub_groups.tolist())))
    if n_splits < 2:
        raise SplitError("a training fold has a single patient; cannot hold out a validation patient")
    first = None
    for attempt in range(5):  # inner splits in order, then reshuffled: the first with both classes on each side
        inner = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 7919 * attempt)
        for train, val in inner.split(indices, labels[indices], sub_groups):
            if first is None:
                first = (train, val)
            if len(set(labels[indices[val]].tolist())) == 2 and len(set(labels[indices[train]].tolist())) == 2:
                return indices[train], indices[val]
    train, val = first  # one class in every candidate (e.g. one positive patient): training warns about it
    return indices[train], indices[val]


def settings_difference(splits: dict, n_folds: int, val_fraction: float, seed: int, require_all: bool = True) -> list[str]:
    """How the settings recorded in ``splits`` differ from the requested ones (empty when they agree).

    ``require_all``: a setting the file does not record counts as a difference (files written by this
    module record all four); otherwise only recorded settings are compared (hand-made files).
    """
    requested = {"n_folds": int(n_folds), "seed": int(seed), "val_fraction": float(val_fraction), "stratification": STRATIFICATION}
    out = []
    for key, want in requested.items():
        if key not in splits:
            if require_all:
                out.append(f"{key} not recorded (requested {want!r})")
            continue
        have = splits[key]
        same = math.isclose(float(have), want) if key == "val_fraction" and isinstance(have, (int, float)) else have == want
        if not same:
            out.append(f"{key} {have!r} in the file, {want!r} requested")
    return out


def check_splits(splits: dict, bags: Sequence[Bag]) -> None:
    """Raise :class:`SplitError` if a fold names an unknown slide, repeats one, or shares a patient
    between its train, val and test parts (or a patient appears in two test folds)."""
    patient = {b.bag_id: b.patient_id for b in bags}
    problems = []
    folds = splits.get("folds")
    if not isinstance(folds, list) or not folds:
        raise SplitError("splits have no 'folds' list")
    test_patients: dict[str, int] = {}
    for i, fold in enumerate(folds):
        name = f"fold {fold.get('fold', i)}"
        parts = {}
        for part in ("train", "val", "test"):
            values = fold.get(part)
            if not isinstance(values, list) or (part != "val" and not values):
                problems.append(f"{name}: '{part}' must be a non-empty list of slide ids")
                values = []
            unknown = [s for s in values if s not in patient]
            if unknown:
                problems.append(f"{name}: {part} names slide(s) not in the cohort: {', '.join(unknown[:5])}")
            parts[part] = [s for s in values if s in patient]
        seen = parts["train"] + parts["val"] + parts["test"]
        if len(seen) != len(set(seen)):
            problems.append(f"{name}: a slide is listed twice")
        p = {part: {patient[s] for s in values} for part, values in parts.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = p[a] & p[b]
            if shared:
                problems.append(f"{name}: patient(s) {', '.join(sorted(shared)[:5])} in both {a} and {b}")
        for pid in p["test"]:
            if pid in test_patients and test_patients[pid] != i:
                problems.append(f"patient {pid} is in the test part of two folds")
            test_patients[pid] = i
    if problems:
        raise SplitError("invalid splits:\n  - " + "\n  - ".join(problems))


def restrict_splits(splits: dict, bags: Sequence[Bag]) -> dict:
    """Drop slide ids the cohort does not have (e.g. skipped for missing features), with a warning."""
    known = {b.bag_id for b in bags}
    dropped = sorted({s for f in splits["folds"] for part in ("train", "val", "test") for s in f.get(part, []) if s not in known})
    if dropped:
        logger.warning("splits name %d slide(s) without usable features; they are left out: %s", len(dropped), ", ".join(dropped[:10]))
    out = dict(splits)
    out["folds"] = [
        {**f, **{part: [s for s in f.get(part, []) if s in known] for part in ("train", "val", "test")}} for f in splits["folds"]
    ]
    return out


def load_or_make_splits(
    bags: Sequence[Bag],
    output_dir: str | Path,
    splits_file: str | Path | None = None,
    n_folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """The splits to use, always also saved as ``<output_dir>/splits.json``.

    ``splits_file`` given: read, checked against the cohort and the requested settings (settings it
    records must match, else :class:`SplitError`) and used. Otherwise an existing
    ``<output_dir>/splits.json`` is reused when it fits the cohort (same slides) and was made with the
    requested settings, else new splits are made (with a warning naming the difference).
    """
    target = OutputLayout(output_dir).splits
    source = Path(splits_file) if splits_file not in (None, "") else None
    if source is None and target.is_file():
        source = target
        reuse = True
    else:
        reuse = False
    if source is not None:
        try:
            splits = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SplitError(f"cannot read splits {source}: {error}") from error
        if not isinstance(splits, dict):
            raise SplitError(f"{source} is not a splits file (a JSON object with 'folds'); see scripts/data/splits.py")
        difference = settings_difference(splits, n_folds, val_fraction, seed, require_all=reuse)
        if reuse:
            listed = {s for f in splits.get("folds", []) for part in ("train", "val", "test") for s in f.get(part, [])}
            if listed != {b.bag_id for b in bags}:
                logger.warning("%s was made for another set of slides; making new splits", source)
                splits = None
            elif difference:
                logger.warning("%s was made with other settings (%s); making new splits with the requested ones",
                               source, "; ".join(difference))  # fmt: skip
                splits = None
            else:
                logger.info("reusing splits %s", source)
        elif difference:
            raise SplitError(
                f"splits file {source} was made with other settings than requested: {'; '.join(difference)}. "
                "Request the file's settings (--n_folds/--seed/--val_fraction), or leave --splits empty to make "
                "new splits."
            )
        if splits is not None:
            splits = restrict_splits(splits, bags)
            check_splits(splits, bags)
    else:
        splits = None
    if splits is None:
        splits = make_splits(bags, n_folds=n_folds, val_fraction=val_fraction, seed=seed)

    if is_main_process():  # under torchrun every rank makes the same splits; rank 0 writes them
        write_json(target, splits)
    return splits


def _arrays(bags: Sequence[Bag]):
    unlabeled = [b.bag_id for b in bags if b.label is None]
    if unlabeled:
        raise SplitError(f"slides without a label cannot be split for training: {', '.join(unlabeled[:10])}")
    ids = np.array([b.bag_id for b in bags])
    labels = np.array([int(b.label) for b in bags])
    groups = np.array([b.patient_id for b in bags])
    return ids, labels, groups
