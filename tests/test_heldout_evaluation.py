"""Fold checkpoints record their data; evaluation refuses cohorts that share patients with it; one-class
validation folds are warned about and counted."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch

from scripts.evaluate import OverlapError, evaluate_cohort
from scripts.mil_data import Bag
from scripts.networks import build_mil_network
from scripts.splits import make_splits
from scripts.training import TrainSettings, load_checkpoint, run_cross_validation

FAST = dict(epochs=2, lr=1e-3, batch_size=4, patience=0, num_threads=1, progress=False)
FACTORY = functools.partial(build_mil_network, "mean_pool")


def _bags(n_patients, positives, prefix="p", slides=1, seed=0):
    rng = np.random.default_rng(seed)
    bags = []
    for p in range(n_patients):
        label = int(p < positives)
        for s in range(slides):
            x = torch.from_numpy(rng.normal(size=(8, 6)).astype(np.float32) + label)
            bags.append(Bag(f"{prefix}{p:02d}_{s}", label, f"{prefix}{p:02d}", features=x))
    return bags


def test_checkpoints_record_data_and_evaluation_refuses_overlap(tmp_path, caplog):
    bags = _bags(12, 6, slides=2)
    splits = make_splits(bags, n_folds=3, seed=0)
    run_cross_validation(FACTORY, bags, splits, TrainSettings(**FAST), output_dir=tmp_path, n_bootstrap=20)
    _, checkpoint = load_checkpoint(tmp_path / "cv" / "fold0" / "model.pt")
    fold = splits["folds"][0]
    assert checkpoint["metadata"]["train_slide_ids"] == fold["train"] and checkpoint["metadata"]["val_slide_ids"] == fold["val"]
    assert set(checkpoint["metadata"]["train_patient_ids"]) == {s.split("_")[0] for s in fold["train"]}

    # two patients of the training cohort among held-out ones: refused, the message counts and names the fix
    mixed = _bags(6, 3, prefix="h", seed=1) + [b for b in bags if b.patient_id in ("p00", "p07")]
    with pytest.raises(OverlapError, match=r"2 of the cohort's 8 patients \(4 slides.*--allow_overlap true"):
        evaluate_cohort(mixed, tmp_path / "cv", tmp_path / "mixed", n_bootstrap=20)
    assert not (tmp_path / "mixed" / "evaluation").exists()
    with caplog.at_level(logging.WARNING):
        summary = evaluate_cohort(mixed, tmp_path / "cv", tmp_path / "mixed", n_bootstrap=20, allow_overlap=True)
    assert summary["overlap"]["in_sample"] and summary["overlap"]["n_patients"] == 2 and "in-sample" in caplog.text
    held_out = evaluate_cohort(_bags(6, 3, prefix="h", seed=1), tmp_path / "cv", tmp_path / "held", n_bootstrap=20)
    assert held_out["overlap"]["n_patients"] == 0 and not held_out["overlap"]["in_sample"]
    assert held_out["ensemble"]["ci_method"].startswith("patient bootstrap (stratified, 20)")


def test_one_class_validation_is_warned_and_counted(tmp_path, caplog):
    # 2 positive patients in 10, 2 folds: each training part has one positive patient, so no validation
    # split can hold both classes while training keeps both
    bags = _bags(10, 2)
    splits = make_splits(bags, n_folds=2, seed=0, val_fraction=0.34)
    one_class = [len({int(s[1:3]) < 2 for s in f["val"]}) < 2 for f in splits["folds"]]
    assert any(one_class)
    with caplog.at_level(logging.WARNING, logger="scripts.training"):
        result = run_cross_validation(FACTORY, bags, splits, TrainSettings(**FAST), n_bootstrap=20)
    assert "fallback: checkpoint selection and early stopping on the validation loss, operating threshold 0.5" in caplog.text
    assert result.summary["n_folds_one_class_validation"] == sum(one_class)
    assert [f["val_one_class"] for f in result.summary["folds"]] == one_class


def test_validation_split_prefers_both_classes():
    # many small patients: every fold's validation part holds both classes
    bags = _bags(20, 6, slides=2)
    for seed in range(5):
        splits = make_splits(bags, n_folds=5, seed=seed)
        for fold in splits["folds"]:
            labels = {int(s[1:3]) < 6 for s in fold["val"]}
            assert labels == {True, False}, (seed, fold["fold"])
