"""Per-fold feature standardisation (scripts.data.feature_norm): fitted on the fold's training bags only, stored
in the fold checkpoint, re-applied by the fold ensemble (evaluation and inference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.data.bags import Bag
from scripts.data.feature_norm import FeatureStandardizer, StandardizedBag, check_feature_norm
from scripts.data.splits import make_splits
from scripts.engines.ensemble import FoldEnsemble
from scripts.engines.mil import predict
from scripts.formats.checkpoints import read_checkpoint, resolve_checkpoints
from scripts.networks.methods import method_factory
from scripts.workflows.training import TrainSettings, run_cross_validation

DIM = 16


def offset_cohort(n_patients=24, slides_per_patient=1, offset=5.0, scale=3.0, shift=6.0, seed=0) -> list[Bag]:
    """In-memory bags whose features sit far from 0 (+offset, x scale): positives carry 4 instances shifted by
    ``shift`` on 8 of the 16 dimensions."""
    rng = np.random.default_rng(seed)
    bags = []
    for p in range(n_patients):
        for s in range(slides_per_patient):
            label = p % 2
            x = rng.normal(size=(int(rng.integers(12, 30)), DIM)) * scale + offset
            if label:
                x[:4, :8] += shift
            bags.append(Bag(f"p{p:02d}s{s}", label, f"p{p:02d}", "c0", features=torch.tensor(x, dtype=torch.float32)))
    return bags


def test_fit_is_the_training_instances_mean_and_std():
    bags = offset_cohort()
    norm = FeatureStandardizer.fit(bags[:10])
    x = torch.cat([b.features for b in bags[:10]]).double()
    np.testing.assert_allclose(norm.mean.numpy(), x.mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), x.std(0, unbiased=False).numpy(), rtol=1e-4)
    assert norm.n_bags == 10 and norm.n_instances == x.shape[0]
    (applied,) = [norm.apply(bags[:1])[0]]
    assert isinstance(applied, StandardizedBag) and applied.features is bags[0].features  # lazy, no copy
    np.testing.assert_allclose(applied.load().numpy(), ((bags[0].features - norm.mean) / norm.std).numpy(), rtol=1e-6)
    again = FeatureStandardizer.from_record(norm.record())
    assert torch.equal(again.mean, norm.mean) and torch.equal(again.std, norm.std)
    assert FeatureStandardizer.from_record({"kind": "none"}) is None and FeatureStandardizer.from_record(None) is None
    assert check_feature_norm(True) == "standardize" and check_feature_norm("none") == "none"
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        check_feature_norm("zscore")
    with pytest.raises(ValueError, match="fitted on 16-d"):
        norm(torch.zeros(3, 8))


def test_no_test_fold_statistic_enters_the_fit_and_evaluation_reapplies_it(tmp_path):
    """The same cohort twice, the second with every fold-0 test bag's features shifted by +1000: fold 0's
    stored statistics are identical (they come from its training bags only), and equal those training bags'
    own mean and std. The fold ensemble then scores a bag exactly as the trained model saw it."""
    bags = offset_cohort()
    splits = make_splits(bags, n_folds=3, val_fraction=0.25, seed=0)
    settings = TrainSettings(epochs=3, batch_size=4, lr=1e-3, patience=0, num_threads=1,
                             feature_norm="standardize", device="cpu")
    test0 = set(splits["folds"][0]["test"])
    shifted = [Bag(b.bag_id, b.label, b.patient_id, b.center, features=b.features + 1000.0) if b.bag_id in test0 else b
               for b in bags]
    run_cross_validation(method_factory("smile"), bags, splits, settings, output_dir=tmp_path / "a", n_bootstrap=50)
    run_cross_validation(method_factory("smile"), shifted, splits, settings, output_dir=tmp_path / "b", n_bootstrap=50)
    a = read_checkpoint(tmp_path / "a" / "cv" / "fold0" / "model.pt")["feature_norm"]
    b = read_checkpoint(tmp_path / "b" / "cv" / "fold0" / "model.pt")["feature_norm"]
    assert a["kind"] == "standardize" and a["mean"] == b["mean"] and a["std"] == b["std"]
    train0 = [x for x in bags if x.bag_id in set(splits["folds"][0]["train"])]
    expected = torch.cat([x.features for x in train0]).double().mean(0)
    np.testing.assert_allclose(a["mean"], expected.numpy(), rtol=1e-5)
    assert a["n_bags"] == len(train0)

    ensemble = FoldEnsemble(tmp_path / "a" / "cv").load()
    assert len(ensemble.feature_norms) == 3 and all(n is not None for n in ensemble.feature_norms)
    probs, per_model = ensemble.score_bags(bags[:5], batch_size=4)
    for model, norm, mine in zip(ensemble.models, ensemble.feature_norms, per_model):
        np.testing.assert_allclose(mine, predict(model, norm.apply(bags[:5]), batch_size=4), rtol=1e-6)
        unnormalised = predict(model, bags[:5], batch_size=4)
        assert not np.allclose(mine, unnormalised, atol=1e-4)  # the transform matters on these features
    paths = resolve_checkpoints(tmp_path / "a" / "cv")
    assert len(paths) == 3


def test_standardising_lets_an_unnormalised_baseline_learn(tmp_path):
    """ABMIL has no input normalisation: on features offset by +20 (unit scale; the signal is 3 units on 4
    instances) it learns little in 20 epochs, and far more once each fold standardises its inputs (the
    comparison's default). Measured here: pooled AUC 0.71 without, 0.93 with."""
    bags = offset_cohort(n_patients=32, offset=20.0, scale=1.0, shift=3.0, seed=1)
    splits = make_splits(bags, n_folds=4, val_fraction=0.25, seed=0)
    aucs = {}
    for norm in ("none", "standardize"):
        settings = TrainSettings(epochs=20, batch_size=4, lr=1e-3, patience=0, num_threads=1,
                                 feature_norm=norm, device="cpu", seed=0)
        result = run_cross_validation(method_factory("abmil"), bags, splits, settings, output_dir=None, n_bootstrap=50)
        assert result.summary["feature_norm"] == norm
        aucs[norm] = result.summary["pooled"]["auc"]
    assert aucs["standardize"] >= 0.85, aucs
    assert aucs["standardize"] - aucs["none"] >= 0.1, aucs
