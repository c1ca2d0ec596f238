"""scripts.engines.ensemble.FoldEnsemble: evaluation and inference load a cv/ folder through it and report the same
operating threshold and the same probabilities on the same checkpoints and slides."""

from __future__ import annotations

import csv
import functools

import h5py
import numpy as np
import pytest
import torch

from scripts.data.bags import bags_from_datalist
from scripts.data.splits import make_splits
from scripts.engines.ensemble import ENSEMBLE_THRESHOLD_RULE, THRESHOLD_FALLBACK, FoldEnsemble
from scripts.networks import build_mil_network
from scripts.networks.bag_classifier import BagClassifier
from scripts.workflows.evaluate import evaluate_cohort
from scripts.workflows.inference import SlideDataset, SlideInference
from scripts.workflows.predict import SlidePredictor
from scripts.workflows.training import TrainSettings, run_cross_validation

DIM = 24
NET = dict(in_dim=DIM, embed_dim=16, attention_dim=8)
FAST = dict(epochs=3, lr=1e-3, batch_size=4, patience=0, num_threads=1)


def _cohort(folder, prefix, n_patients, seed):
    """One feature file per slide (bundle layout: features, coords, patch size), a datalist with labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    datalist = folder / "datalist.csv"
    with open(datalist, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["slide_id", "path", "label", "patient_id", "center", "features"])
        for p in range(n_patients):
            label = p % 2
            n = int(rng.integers(6, 14))
            feats = rng.normal(size=(n, DIM)).astype(np.float32)
            feats[: 1 + n // 4] += 1.5 * label  # a few positive patches per positive slide
            path = folder / f"{prefix}{p}.h5"
            with h5py.File(path, "w") as h5:
                h5["features"] = feats
                h5["coords"] = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
                h5.attrs["patch_size_level0"] = 256
                h5.attrs["patch_size"] = 256
            w.writerow([f"{prefix}{p}", "", label, f"{prefix}P{p}", "c", path.name])
    return datalist


def test_evaluate_and_inference_agree_on_threshold_and_probabilities(tmp_path):
    train_list = _cohort(tmp_path / "train", "t", 24, seed=0)
    bags = bags_from_datalist(train_list)
    splits = make_splits(bags, n_folds=3, seed=0)
    factory = functools.partial(build_mil_network, "smile", **NET)
    run_cross_validation(factory, bags, splits, TrainSettings(**FAST), output_dir=tmp_path / "run", n_bootstrap=20)
    cv = tmp_path / "run" / "cv"
    # fold 0 as if its validation split had been one-class: its threshold fell back to 0.5 and must not count
    fold0 = cv / "fold0" / "model.pt"
    checkpoint = torch.load(fold0, weights_only=True)
    checkpoint.update(threshold=0.5, threshold_source=THRESHOLD_FALLBACK)
    torch.save(checkpoint, fold0)

    held = _cohort(tmp_path / "held", "h", 6, seed=1)
    summary = evaluate_cohort(bags_from_datalist(held), cv, tmp_path / "eval", n_bootstrap=20)
    evaluated = {r["slide_id"]: float(r["prob"]) for r in csv.DictReader(open(tmp_path / "eval" / "evaluation" / "predictions.csv"))}

    predictor = SlidePredictor(BagClassifier("smile", **NET), None, cv, tmp_path / "infer", patch_size=256, target_mpp=0.5)
    rows = {r["slide_id"]: r for r in SlideInference(SlideDataset(held), predictor).run()}

    ensemble = FoldEnsemble(cv).load()
    others = [float(torch.load(cv / f"fold{k}" / "model.pt", weights_only=True)["threshold"]) for k in (1, 2)]
    assert ensemble.threshold == pytest.approx(np.mean(others))  # fold 0 left out, as the rule says
    assert ensemble.threshold_record["fallback_folds"] == ["fold0"] and ensemble.threshold_record["rule"] == ENSEMBLE_THRESHOLD_RULE
    assert summary["threshold"] == pytest.approx(ensemble.threshold, abs=1e-12)
    assert predictor.threshold == pytest.approx(ensemble.threshold, abs=1e-12)
    assert set(rows) == set(evaluated)
    for slide_id, row in rows.items():
        assert row["status"] == "ok", row
        assert float(row["threshold"]) == pytest.approx(summary["threshold"], abs=1e-6)
        assert float(row["probability"]) == pytest.approx(evaluated[slide_id], abs=2e-6)
        assert row["predicted_label"] == int(float(row["probability"]) >= predictor.threshold)


def test_a_given_threshold_replaces_the_rule(tmp_path):
    train_list = _cohort(tmp_path / "train", "t", 24, seed=2)
    bags = bags_from_datalist(train_list)
    factory = functools.partial(build_mil_network, "smile", **NET)
    run_cross_validation(factory, bags, make_splits(bags, n_folds=2, seed=0), TrainSettings(**FAST),
                         output_dir=tmp_path / "run", n_bootstrap=10)
    fixed = FoldEnsemble(tmp_path / "run" / "cv", threshold=0.37).load()
    assert fixed.threshold == 0.37 and fixed.threshold_record["rule"].startswith("given: 0.37")
    assert len(fixed) == 2 and fixed.names == ["fold0", "fold1"]
