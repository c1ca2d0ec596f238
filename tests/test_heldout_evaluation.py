"""Fold checkpoints record their data; evaluation refuses cohorts that share patients with it; one-class
validation folds are warned about and counted."""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import pytest
import torch

from scripts.data.bags import Bag
from scripts.data.heldout import OverlapError
from scripts.data.splits import make_splits
from scripts.networks import build_mil_network
from scripts.workflows.evaluate import evaluate_cohort
from scripts.workflows.training import TrainSettings, load_checkpoint, run_cross_validation

FAST = dict(epochs=2, lr=1e-3, batch_size=4, patience=0, num_threads=1)
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
    _, fold0 = load_checkpoint(tmp_path / "cv" / "fold0" / "model.pt")
    assert held_out["threshold_rule"]["fold_thresholds"]["fold0"] == pytest.approx(fold0["threshold"])
    assert held_out["threshold"] == pytest.approx(np.mean(list(held_out["threshold_rule"]["fold_thresholds"].values())))


def test_one_class_validation_is_warned_and_counted(tmp_path, caplog):
    # 2 positive patients in 10, 2 folds: each training part has one positive patient, so no validation
    # split can hold both classes while training keeps both
    bags = _bags(10, 2)
    splits = make_splits(bags, n_folds=2, seed=0, val_fraction=0.34)
    one_class = [len({int(s[1:3]) < 2 for s in f["val"]}) < 2 for f in splits["folds"]]
    assert any(one_class)
    with caplog.at_level(logging.WARNING, logger="scripts.workflows.training"):
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


def test_ablation_choice_reads_validation_only():
    from scripts.experiments.ablation import choose_on_validation

    rows = [
        {"threshold": 0.5, "factor": 0.3, "val_auc_mean": 0.70, "val_loss_mean": 0.6, "auc_mean": 0.95, "pooled_auc": 0.9},
        {"threshold": 0.5, "factor": 0.8, "val_auc_mean": 0.80, "val_loss_mean": 0.5, "auc_mean": 0.60, "pooled_auc": 0.6},
        {"threshold": 0.7, "factor": 0.3, "val_auc_mean": 0.80, "val_loss_mean": 0.4, "auc_mean": 0.50, "pooled_auc": 0.5},
        {"threshold": 0.7, "factor": 0.8, "val_auc_mean": None, "val_loss_mean": 0.1, "auc_mean": 0.99, "pooled_auc": 0.99},
    ]
    chosen = choose_on_validation(rows)
    assert (chosen["threshold"], chosen["factor"]) == (0.7, 0.3)  # best val AUC, tie broken by val loss; test AUC ignored


def test_ensemble_threshold_rule_and_fallback(caplog):
    from scripts.engines.ensemble import ENSEMBLE_THRESHOLD_RULE, ensemble_threshold
    from scripts.engines.mil import THRESHOLD_FALLBACK, THRESHOLD_SOURCE

    folds = [("fold0", {"threshold": 0.3, "threshold_source": THRESHOLD_SOURCE}),
             ("fold1", {"threshold": 0.5, "threshold_source": THRESHOLD_FALLBACK}),
             ("fold2", {"threshold": 0.5, "threshold_source": THRESHOLD_SOURCE})]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="scripts.workflows.evaluate"):
        threshold, record = ensemble_threshold(folds)
    assert threshold == pytest.approx(0.4) and record["fallback_folds"] == ["fold1"] and record["rule"] == ENSEMBLE_THRESHOLD_RULE
    assert "fold1" in caplog.text and "mean of the other 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.workflows.evaluate"):
        threshold, record = ensemble_threshold([("fold0", {"threshold": 0.5, "threshold_source": THRESHOLD_FALLBACK})])
    assert threshold == 0.5 and record["fell_back_to_0.5"] and "fallback 0.5" in caplog.text


def test_inference_and_transfer_only_warn(caplog):
    from scripts.data.heldout import check_overlap
    from scripts.experiments.transfer import shared_patients

    cohort = _bags(4, 2)
    checkpoint = {"metadata": {"train_patient_ids": ["p00"], "val_patient_ids": ["p03"]}}
    with caplog.at_level(logging.WARNING, logger="scripts.data.heldout"):
        record = check_overlap(cohort, [("fold0", checkpoint)], "cv", refuse=False, what="inference")
    assert record["in_sample"] and record["n_patients"] == 2 and "inference: 2 of the cohort's 4 patients" in caplog.text
    a, b = _bags(2, 1, prefix="a"), _bags(2, 1, prefix="b")
    b[0] = dataclasses.replace(b[0], patient_id=a[1].patient_id)
    assert shared_patients({"A": a, "B": b}) == [a[1].patient_id]
