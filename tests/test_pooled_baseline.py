"""The mean+max pooled logistic-regression floor (scripts/experiments/pooled_baseline.py) and its benchmark line."""

import numpy as np
import pytest
import torch

from scripts.data.bags import Bag, bags_from_npz
from scripts.data.splits import make_splits
from scripts.experiments.pooled_baseline import fit_pooled, pooled_cross_validation, pooled_features, predict_pooled
from scripts.metrics import auc


def test_pooled_features_are_mean_then_max():
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, 5.0]])
    out = pooled_features([Bag("a", 1, "p", features=x)])
    np.testing.assert_allclose(out, [[2.0, 1.0, 3.0, 5.0]])


def test_floor_separates_a_max_signal_and_refuses_one_class():
    rng = np.random.default_rng(0)
    bags = []
    for i in range(40):
        x = rng.normal(size=(20, 5)).astype(np.float32)
        if i % 2:
            x[0, 2] += 6.0  # one strong instance: visible in the max, barely in the mean
        bags.append(Bag(f"b{i}", i % 2, f"p{i}", features=torch.from_numpy(x)))
    model = fit_pooled(bags[:30])
    assert auc([b.label for b in bags[30:]], predict_pooled(model, bags[30:])) > 0.9
    with pytest.raises(ValueError, match="both classes"):
        fit_pooled([b for b in bags if b.label == 1])


def test_floor_on_musk1_folds(shared_mil):
    bags = bags_from_npz(shared_mil / "musk1.npz")
    splits = make_splits(bags, n_folds=5, seed=0)
    result = pooled_cross_validation(bags, splits, n_bootstrap=100)
    assert len(result["predictions"]) == 92 and {r["fold"] for r in result["predictions"]} == set(range(5))
    pooled = result["summary"]["pooled"]
    assert pooled["auc"] > 0.8 and pooled["auc_ci"][0] < pooled["auc"] < pooled["auc_ci"][1]
    assert pooled["ci_method"].startswith("patient bootstrap (stratified, 100)")
