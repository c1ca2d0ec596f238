"""Per-fold feature standardisation (``feature_norm: none | standardize``).

Frozen-encoder features are not centred: CTransPath's have per-dimension means far from 0 and scales
that differ by orders of magnitude. SMILE copes through its input BatchNorm; most MIL baselines (ABMIL,
CLAM, mean/max pooling) have no input normalisation, so a comparison on raw features measures input
scaling as much as the method. With ``standardize`` each fold fits a per-dimension mean and standard
deviation on **its training bags' instances only** (never its validation or test bags), every bag is
standardised with them on the fly (nothing is copied: :class:`StandardizedBag` applies it when the bag is
read), and the statistics are stored in the fold checkpoint (``feature_norm``), so evaluation and inference
(:class:`scripts.engines.ensemble.FoldEnsemble`) apply exactly the same transform.

Why not scikit-learn's ``StandardScaler``: the instances of a cohort do not fit in memory; the fit here
streams bag by bag (float64 sums, one pass), which ``partial_fit`` would also do but with a NumPy copy of
every bag; the transform must run on torch tensors inside the training and inference loops.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from scripts.data.bags import Bag

FEATURE_NORMS = ("none", "standardize")
MIN_STD = 1e-6  # dimensions constant over the training instances are centred, not blown up


@dataclass(frozen=True, eq=False)
class StandardizedBag(Bag):
    """A :class:`~scripts.data.bags.Bag` whose features are standardised when read."""

    standardizer: Any = None

    def load(self) -> torch.Tensor:
        return self.standardizer(super().load())


@dataclass(frozen=True, eq=False)
class FeatureStandardizer:
    """``x -> (x - mean) / std`` per feature dimension, with statistics of the bags it was fitted on."""

    mean: torch.Tensor
    std: torch.Tensor
    n_bags: int
    n_instances: int

    @classmethod
    def fit(cls, bags: Sequence[Bag]) -> "FeatureStandardizer":
        """Mean and standard deviation (population) of every instance of ``bags``, read once, bag by bag."""
        if not bags:
            raise ValueError("feature standardisation needs at least one training bag to fit on")
        total = squares = None
        count = 0
        for bag in bags:
            x = bag.load().detach().to(torch.float64)
            if x.ndim != 2 or x.shape[0] == 0:
                continue
            total = x.sum(0) if total is None else total + x.sum(0)
            squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
            count += int(x.shape[0])
        if not count:
            raise ValueError("feature standardisation: the training bags hold no instances")
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        return cls(mean.float(), var.sqrt().clamp_min(MIN_STD).float(), len(bags), count)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"features are {x.shape[-1]}-d but the standardiser was fitted on "
                             f"{self.mean.shape[0]}-d features")
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def apply(self, bags: Sequence[Bag]) -> list[Bag]:
        """``bags`` as :class:`StandardizedBag` (lazy: features are standardised when each bag is read)."""
        out = []
        for bag in bags:
            values = {f.name: getattr(bag, f.name) for f in fields(Bag)}  # every Bag field, whatever is added
            if isinstance(bag, StandardizedBag):
                raise ValueError(f"bag {bag.bag_id!r} is standardised already")
            out.append(StandardizedBag(**values, standardizer=self))
        return out

    def record(self) -> dict:
        """What the fold checkpoint stores (plain lists: loadable with ``weights_only``)."""
        return {"kind": "standardize", "fitted_on": "the fold's training bags", "n_bags": self.n_bags,
                "n_instances": self.n_instances, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_record(cls, record: Mapping | None) -> "FeatureStandardizer | None":
        """The standardiser a checkpoint's ``feature_norm`` describes; None for none/absent."""
        if not record or str(record.get("kind", "none")) == "none":
            return None
        if record.get("kind") != "standardize":
            raise ValueError(f"unknown feature_norm kind {record.get('kind')!r} (expected one of {FEATURE_NORMS})")
        return cls(torch.tensor(record["mean"], dtype=torch.float32), torch.tensor(record["std"], dtype=torch.float32),
                   int(record.get("n_bags", 0)), int(record.get("n_instances", 0)))


def check_feature_norm(value: Any) -> str:
    """``value`` as one of :data:`FEATURE_NORMS` (``false``/``null`` -> none, ``true`` -> standardize)."""
    if value in (None, False, "", "false", "False"):
        return "none"
    if value is True or value in ("true", "True"):
        return "standardize"
    name = str(value).strip().lower()
    if name not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}; got {value!r}")
    return name


def fit_feature_norm(kind: Any, train_bags: Sequence[Bag]) -> FeatureStandardizer | None:
    """The fold's standardiser for ``kind`` (None for ``none``), fitted on ``train_bags`` only."""
    return FeatureStandardizer.fit(train_bags) if check_feature_norm(kind) == "standardize" else None


def standardize_bags(standardizer: FeatureStandardizer | None, *groups: Sequence[Bag]) -> tuple[list[Bag], ...]:
    """Each group of bags through ``standardizer`` (unchanged lists when it is None)."""
    return tuple(list(group) if standardizer is None else standardizer.apply(group) for group in groups)


__all__ = ["FEATURE_NORMS", "FeatureStandardizer", "StandardizedBag", "check_feature_norm", "fit_feature_norm",
           "standardize_bags"]
