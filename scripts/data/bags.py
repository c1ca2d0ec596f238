"""Bags of instance features for MIL training and evaluation, read lazily.

A :class:`Bag` names one slide (or one classic-MIL bag): its label, its patient, and where its features
are: a feature file (read only when the bag is used, so a cohort need not fit in memory) or an
in-memory tensor (the small classic ``.npz`` benchmarks).

Feature files (this bundle's, CLAM's ``h5_files``/``pt_files``, TRIDENT's ``features_<encoder>``) are
read by :mod:`scripts.formats.feature_file`.
Classic MIL ``.npz`` (arrays ``X`` instances, ``bag`` bag index, ``bag_y`` bag labels): :func:`bags_from_npz`.

Batches are packed (:func:`collate_bags`): all instances of the batch's bags in one (M, D) tensor plus
the (M,) bag index, the layout every network of :mod:`scripts.networks` takes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from scripts.data.datalist import DatalistError, load_datalist
from scripts.formats.feature_file import (
    FeatureFileError,
    FeatureMismatchError,
    cohort_record,
    feature_info,
    feature_shape,
    find_feature_file,
    load_features,
    patch_geometry,
)
from scripts.formats.fingerprint import describe_duplicates, duplicate_contents

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Bag:
    """One bag: ``features_path`` (read lazily) or ``features`` (in memory), a 0/1 label (None when
    unknown), the patient (cross-validation never splits one) and the centre. ``slide_path``: the slide
    file the features came from, when the datalist names one (fingerprinted into fold checkpoints)."""

    bag_id: str
    label: int | None
    patient_id: str
    center: str = ""
    features_path: Path | None = None
    features: torch.Tensor | None = None
    slide_path: Path | None = None

    def load(self) -> torch.Tensor:
        if self.features is not None:
            return self.features
        if self.features_path is None:
            raise ValueError(f"bag {self.bag_id!r} has neither a feature file nor features")
        return load_features(self.features_path)


class BagList(list):
    """A list of bags that also remembers the datalist's ``skipped`` slides (id: reason)."""

    skipped: list[str]
    feature_record: dict


def feature_dim(bags: Sequence[Bag]) -> int:
    """The instance feature size of a cohort (from the first bag; all bags are checked to agree when
    the cohort is built by :func:`bags_from_datalist`)."""
    if not bags:
        raise ValueError("no bags: nothing to read the feature size from")
    first = bags[0]
    if first.features is not None:
        return int(first.features.shape[1])
    return feature_shape(first.features_path)[1]


def bags_from_datalist(
    datalist: str | Path,
    features_dir: str | Path | None = None,
    require_labels: bool = True,
) -> BagList:
    """The bags of a datalist whose feature file exists and is readable.

    A row's features are its ``features`` column when set, else found under ``features_dir`` by
    :func:`scripts.formats.feature_file.find_feature_file` (``<slide_id>.h5`` / ``.pt``, CLAM's
    ``h5_files/`` and ``pt_files/``, TRIDENT's ``features_<encoder>/``). Slides without a usable feature file
    (failed extraction) are reported in one warning and skipped; if none is left, the error says where the
    files were looked for. A cohort that mixes feature sizes, encoders or patch scales is refused.
    The returned list's ``feature_record`` (encoder, feature_dim, target_mpp) goes into each fold checkpoint.
    Two rows whose slide files or feature files (found either way) have the same content are refused
    (:class:`scripts.data.datalist.DatalistError` naming both rows).
    """
    records = load_datalist(datalist, require_labels=require_labels, check_files=False, require_slides=False,
                            check_duplicates=True)
    lines = {record.slide_id: line for line, record in enumerate(records, start=2)}
    features_dir = None if features_dir in (None, "") else Path(features_dir)
    bags: list[Bag] = []
    skipped: list[str] = []
    dims: dict[int, str] = {}
    described = []
    for record in records:
        if record.features is None and features_dir is None:
            skipped.append(f"{record.slide_id}: no 'features' column value and no features_dir given")
            continue
        try:
            path = find_feature_file(record.slide_id, record.features, None, [features_dir] if features_dir else [])
        except FeatureFileError as error:
            skipped.append(f"{record.slide_id}: {error}")
            continue
        if path is None:
            path = features_dir / f"{record.slide_id}.h5"
        if not path.is_file():
            skipped.append(f"{record.slide_id}: {path} does not exist")
            continue
        try:
            n, d = feature_shape(path)
            info = feature_info(path)
        except (FeatureFileError, RuntimeError, OSError) as error:
            skipped.append(f"{record.slide_id}: {error}")
            continue
        geometry = None
        if info.patch is not None or info.layout != "bundle":
            try:
                geometry = patch_geometry(path, record.slide_id, None, slide_mpp=record.mpp, info=info)
            except Exception:  # noqa: BLE001 - a scale we cannot tell is not checked
                geometry = None
        described.append((record.slide_id, info, geometry))
        dims.setdefault(d, record.slide_id)
        bags.append(Bag(record.slide_id, record.label, record.patient_id, record.center, features_path=path,
                        slide_path=record.path))
    duplicates = duplicate_contents((f"line {lines[b.bag_id]} (slide {b.bag_id!r})", b.features_path) for b in bags)
    if duplicates:  # feature files found under features_dir (the datalist's own columns were checked already)
        listed = "\n  - ".join(describe_duplicates(group, "feature file") for group in duplicates)
        raise DatalistError(f"datalist {datalist} has {len(duplicates)} problem(s):\n  - {listed}")
    if len(dims) > 1:
        listed = ", ".join(f"{d} (e.g. {s})" for d, s in dims.items())
        raise FeatureFileError(f"datalist {datalist}: feature files disagree on the feature size: {listed}; use one encoder")
    try:
        feature_record = cohort_record(described)
    except FeatureMismatchError as error:
        raise FeatureMismatchError(f"datalist {datalist}: {error}") from None
    if skipped:
        logger.warning(
            "%d of %d slide(s) in %s have no usable features and are skipped:\n  %s",
            len(skipped), len(records), datalist, "\n  ".join(skipped),
        )  # fmt: skip
    if not bags:
        where = f" (looked in {features_dir})" if features_dir is not None else ""
        raise FeatureFileError(f"no slide of {datalist} has a usable feature file{where}; run feature extraction first")
    result = BagList(bags)
    result.skipped = skipped
    result.feature_record = feature_record
    return result


def skipped_slides(datalist: str | Path, bags: Sequence[Bag]) -> list[str]:
    """Slide ids of the datalist that are not among ``bags`` (reported in summaries)."""
    kept = {b.bag_id for b in bags}
    records = load_datalist(datalist, require_labels=False, check_files=False, require_slides=False)
    return [r.slide_id for r in records if r.slide_id not in kept]


def bags_from_npz(path: str | Path) -> list[Bag]:
    """Bags of a classic MIL ``.npz`` (``X`` (M, D), ``bag`` (M,), ``bag_y`` (B,)); each bag is its own
    patient. Features are held in memory (these sets are small)."""
    path = Path(path)
    with np.load(path) as data:
        missing = [k for k in ("X", "bag", "bag_y") if k not in data]
        if missing:
            raise FeatureFileError(f"{path}: missing array(s) {', '.join(missing)}; expected X, bag, bag_y")
        x = torch.from_numpy(np.asarray(data["X"], dtype=np.float32))
        bag = np.asarray(data["bag"], dtype=np.int64)
        labels = np.asarray(data["bag_y"]).astype(int)
    order = np.argsort(bag, kind="stable")
    starts = np.searchsorted(bag[order], np.arange(len(labels) + 1))
    bags = []
    for b, label in enumerate(labels):
        rows = torch.from_numpy(order[starts[b] : starts[b + 1]])
        if len(rows) == 0:
            raise FeatureFileError(f"{path}: bag {b} has no instances")
        bags.append(Bag(f"bag{b:04d}", int(label > 0), f"bag{b:04d}", features=x[rows]))
    return bags


class BagDataset(Dataset):
    """Items ``{"features": (N, D), "label": float tensor, "bag_id": str}``; files are opened per item."""

    def __init__(self, bags: Sequence[Bag]) -> None:
        self.bags = list(bags)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict:
        bag = self.bags[index]
        label = float("nan") if bag.label is None else float(bag.label)
        return {"features": bag.load(), "label": torch.tensor(label), "bag_id": bag.bag_id}


def collate_bags(items: Sequence[dict]) -> dict:
    """Pack a list of :class:`BagDataset` items: ``features`` (M, D), ``bag_index`` (M,), ``n_bags``,
    ``label`` (B,), ``bag_id`` list."""
    sizes = torch.tensor([item["features"].shape[0] for item in items])
    return {
        "features": torch.cat([item["features"] for item in items], 0),
        "bag_index": torch.repeat_interleave(torch.arange(len(items)), sizes),
        "n_bags": len(items),
        "label": torch.stack([item["label"] for item in items]),
        "bag_id": [item["bag_id"] for item in items],
    }
