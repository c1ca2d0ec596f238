"""MIL data, splits, metrics, fold training and the train/evaluate bundle workflows on a synthetic cohort."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from scripts.data.bags import BagDataset, bags_from_datalist, bags_from_npz, collate_bags, load_features
from scripts.data.splits import SplitError, load_or_make_splits, make_splits
from scripts.engines.mil import predict
from scripts.metrics import bootstrap_auc_ci, threshold_metrics, youden_threshold
from scripts.networks import build_mil_network
from scripts.workflows.training import TrainSettings, load_checkpoint, run_cross_validation, train_fold

DIM = 24


def make_cohort(root, n_slides=30, n_patients=20, missing=("s29",), seed=0, prefix=""):
    """~30 slides of ~20 patients; positive slides carry 4 shifted instances among 15-40 noise ones."""
    rng = np.random.default_rng(seed)
    (root / "out" / "features").mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,label,patient_id,center"]
    for i in range(n_slides):
        patient = i % n_patients
        label = patient % 2
        slide_id = f"{prefix}s{i:02d}"
        x = rng.normal(size=(int(rng.integers(15, 40)), DIM)).astype(np.float32)
        if label:
            x[:4] += 2.0
        if slide_id not in missing:
            with h5py.File(root / "out" / "features" / f"{slide_id}.h5", "w") as handle:
                handle["features"] = x
                handle["coords"] = np.zeros((len(x), 2), dtype=np.int64)
        rows.append(f"{slide_id},slides/{slide_id}.tif,{label},{prefix}p{patient:02d},c{patient % 3}")
    (root / "datalist.csv").write_text("\n".join(rows) + "\n")
    return root / "datalist.csv", root / "out"


FAST = dict(lr=1e-3, batch_size=4, patience=0, num_threads=1)


def test_bags_skip_missing_features_and_read_formats(tmp_path, caplog):
    datalist, out = make_cohort(tmp_path)
    bags = bags_from_datalist(datalist, out / "features")
    assert len(bags) == 29 and "s29" not in {b.bag_id for b in bags}
    assert any("s29" in s for s in bags.skipped) and "s29" in caplog.text
    item = BagDataset(bags)[0]
    assert item["features"].shape[1] == DIM and item["features"].dtype == torch.float32
    batch = collate_bags([BagDataset(bags)[i] for i in range(3)])
    assert batch["features"].shape[0] == batch["bag_index"].shape[0] and batch["n_bags"] == 3
    assert batch["bag_index"].max() == 2 and batch["label"].shape == (3,)
    # .pt tensors (CLAM) and dicts, h5 with a leading singleton axis (TRIDENT-style)
    x = torch.randn(7, DIM)
    torch.save(x, tmp_path / "a.pt")
    torch.save({"features": x}, tmp_path / "b.pt")
    with h5py.File(tmp_path / "c.h5", "w") as handle:
        handle["features"] = x.numpy()[None]
    for name in ("a.pt", "b.pt", "c.h5"):
        torch.testing.assert_close(load_features(tmp_path / name), x)
    with h5py.File(tmp_path / "bad.h5", "w") as handle:
        handle["feats"] = x.numpy()
    with pytest.raises(ValueError, match="bad.h5.*no dataset 'features'"):
        load_features(tmp_path / "bad.h5")


def test_features_column_overrides_features_dir(tmp_path):
    torch.save(torch.randn(5, DIM), tmp_path / "x.pt")
    (tmp_path / "d.csv").write_text("slide_id,path,label,patient_id,center,features\nx,,1,p,c,x.pt\n")
    bags = bags_from_datalist(tmp_path / "d.csv", features_dir=None)
    assert bags[0].features_path == tmp_path / "x.pt" and bags[0].load().shape == (5, DIM)


def test_patient_level_splits(tmp_path, caplog):
    datalist, out = make_cohort(tmp_path)
    bags = bags_from_datalist(datalist, out / "features")
    splits = load_or_make_splits(bags, out, n_folds=5, seed=3)
    patient = {b.bag_id: b.patient_id for b in bags}
    test_patients = [{patient[s] for s in f["test"]} for f in splits["folds"]]
    for i, fold in enumerate(splits["folds"]):
        parts = {p: {patient[s] for s in fold[p]} for p in ("train", "val", "test")}
        assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
        assert fold["val"], "every fold has a validation split"
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == sorted(patient)
        for j in range(i):
            assert not (test_patients[i] & test_patients[j])
    assert sorted(s for f in splits["folds"] for s in f["test"]) == sorted(patient)
    assert json.loads((out / "splits.json").read_text()) == splits
    assert splits["n_folds"] == 5 and splits["seed"] == 3 and splits["val_fraction"] == 0.2 and splits["stratification"]
    # reused on the next call with the same settings
    assert load_or_make_splits(bags, out, n_folds=5, seed=3) == splits
    # other settings: new splits, with a warning naming the difference
    with caplog.at_level(logging.WARNING, logger="scripts.data.splits"):
        other = load_or_make_splits(bags, out, n_folds=4, seed=7, val_fraction=0.3)
    assert "n_folds 5 in the file, 4 requested" in caplog.text and "seed 3 in the file, 7 requested" in caplog.text
    assert "val_fraction" in caplog.text
    assert (other["n_folds"], other["seed"], other["val_fraction"], len(other["folds"])) == (4, 7, 0.3, 4)
    assert json.loads((out / "splits.json").read_text()) == other
    # the same file given explicitly with other settings is an error naming the difference
    (tmp_path / "given.json").write_text(json.dumps(splits))
    with pytest.raises(SplitError, match="n_folds 5 in the file, 10 requested"):
        load_or_make_splits(bags, tmp_path / "o2", splits_file=tmp_path / "given.json", n_folds=10, seed=3)
    assert load_or_make_splits(bags, tmp_path / "o3", splits_file=tmp_path / "given.json", n_folds=5, seed=3) == splits
    # a user file that leaks a patient between train and test is refused
    leaky = json.loads(json.dumps(splits))
    moved = next(s for s in leaky["folds"][0]["test"] if sum(patient[t] == patient[s] for t in patient) > 1)
    partner = next(t for t in patient if patient[t] == patient[moved] and t != moved)
    for part in ("train", "val", "test"):
        leaky["folds"][0][part] = [s for s in leaky["folds"][0][part] if s != partner]
    leaky["folds"][0]["train"].append(partner)
    (tmp_path / "leaky.json").write_text(json.dumps(leaky))
    with pytest.raises(SplitError, match="in both train and test"):
        load_or_make_splits(bags, tmp_path / "other", splits_file=tmp_path / "leaky.json", seed=3)
    with pytest.raises(SplitError, match="patient"):
        make_splits(bags[:3], n_folds=5)


def test_metrics():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.4, 0.6, 0.35, 0.8, 0.9]
    m = threshold_metrics(y, p, 0.5)
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (2, 2, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    low, high = bootstrap_auc_ci(y, p, n_boot=500)
    assert 0 <= low <= 7 / 9 <= high <= 1
    assert youden_threshold(y, p) in p


def test_train_fold_learns_and_checkpoint_roundtrip(tmp_path):
    datalist, out = make_cohort(tmp_path)
    bags = bags_from_datalist(datalist, out / "features")
    splits = make_splits(bags, n_folds=5, seed=0)
    by_id = {b.bag_id: b for b in bags}
    fold = splits["folds"][0]
    factory = functools.partial(build_mil_network, "smile", embed_dim=32, attention_dim=16)
    model, history = train_fold(
        factory, [by_id[s] for s in fold["train"]], [by_id[s] for s in fold["val"]], TrainSettings(epochs=30, **FAST)
    )
    assert len(history["epochs"]) == 30 and 1 <= history["best_epoch"] <= 30
    assert history["epochs"][-1]["train_loss"] < history["epochs"][0]["train_loss"]
    assert history["network"]["name"] == "smile" and history["network"]["kwargs"]["in_dim"] == DIM
    from scripts.formats.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "m.pt", model, network=history["network"])
    again, _ = load_checkpoint(tmp_path / "m.pt")
    test = [by_id[s] for s in fold["test"]]
    np.testing.assert_allclose(predict(again, test), predict(model, test), atol=1e-6)


@pytest.mark.slow
def test_bundle_train_and_evaluate_workflows(tmp_path, bundle_root):
    """The real `python -m monai.bundle run` commands on the synthetic cohort."""
    datalist, out = make_cohort(tmp_path)
    common = [sys.executable, "-m", "monai.bundle", "run"]
    train = common + [
        "training", "--config_file", "configs/train.json", "--datalist", str(datalist), "--output_dir", str(out),
        "--epochs", "20", "--optimizer_name", "adam", "--lr", "0.001", "--batch_size", "4", "--num_threads", "1", "--n_bootstrap", "200",
        "--network_def#embed_dim", "32", "--network_def#attention_dim", "16",
    ]  # fmt: skip
    done = subprocess.run(train, cwd=bundle_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "s29" in done.stdout + done.stderr  # the slide without features is reported
    cv = out / "cv"
    summary = json.loads((cv / "summary.json").read_text())
    assert len(summary["folds"]) == 5 and summary["n_slides"] == 29
    for key in ("auc", "auc_ci", "at_0.5", "at_val_threshold"):
        assert key in summary["folds"][0] and key in summary["pooled"]
    assert summary["mean"]["auc"] is not None and summary["std"]["auc"] is not None
    assert summary["pooled"]["auc"] > 0.8, summary["pooled"]  # a separable signal is learnt
    splits = json.loads((out / "splits.json").read_text())
    rows = (cv / "oof_predictions.csv").read_text().splitlines()
    assert len(rows) == 30
    patients_per_fold = {}
    for row in rows[1:]:
        slide_id, patient_id, _, _, _, fold, _ = row.split(",")
        patients_per_fold.setdefault(patient_id, set()).add(fold)
    assert all(len(folds) == 1 for folds in patients_per_fold.values())  # no patient in two test folds
    assert {s for f in splits["folds"] for s in f["test"]} == {r.split(",")[0] for r in rows[1:]}
    by_slide = {r.split(",")[0]: r.split(",")[1] for r in rows[1:]}
    for k in range(5):
        model, checkpoint = load_checkpoint(cv / f"fold{k}" / "model.pt")
        assert checkpoint["network"]["name"] == "smile" and checkpoint["feature_dim"] == DIM
        fold = splits["folds"][k]
        assert checkpoint["metadata"]["train_slide_ids"] == fold["train"] and checkpoint["metadata"]["val_slide_ids"] == fold["val"]
        assert checkpoint["metadata"]["train_patient_ids"] == sorted({by_slide[s] for s in fold["train"]})
        assert checkpoint["metadata"]["val_patient_ids"] == sorted({by_slide[s] for s in fold["val"]})
    assert (cv / "roc.png").stat().st_size > 1000 and (cv / "model.pt").is_file()

    assert summary["pooled"]["ci_method"] == "patient bootstrap (stratified, 200), percentile 95%"
    assert summary["folds"][0]["ci_method"].startswith("patient bootstrap")

    # a held-out cohort (other patients, same signal): the fold ensemble generalises to it
    heldout, heldout_out = make_cohort(tmp_path / "heldout", n_slides=24, n_patients=24, missing=(), seed=1, prefix="h")
    evaluate = common + [
        "--config_file", "configs/evaluate.json", "--datalist", str(heldout), "--features_dir", str(heldout_out / "features"),
        "--models_dir", str(cv), "--output_dir", str(heldout_out), "--n_bootstrap", "200",
    ]  # fmt: skip
    done = subprocess.run(evaluate, cwd=bundle_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((heldout_out / "evaluation" / "summary.json").read_text())
    assert len(result["fold_models"]) == 5 and result["n_slides"] == 24
    assert result["overlap"]["n_patients"] == 0 and not result["overlap"]["in_sample"]
    assert result["ensemble"]["auc"] > 0.8  # out-of-sample: patients no fold model saw
    assert result["ensemble"]["ci_method"].startswith("patient bootstrap (stratified, 200)")

    # the training cohort itself is refused, naming the overlap and the fix; --allow_overlap true stamps it
    in_sample = common + ["--config_file", "configs/evaluate.json", "--datalist", str(datalist), "--output_dir", str(out),
                          "--n_bootstrap", "50"]  # fmt: skip
    done = subprocess.run(in_sample, cwd=bundle_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "20 of the cohort's 20 patients" in done.stderr and "--allow_overlap true" in done.stderr, done.stderr[-2000:]
    assert not (out / "evaluation" / "summary.json").exists()
    done = subprocess.run(in_sample + ["--allow_overlap", "true"], cwd=bundle_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stamped = json.loads((out / "evaluation" / "summary.json").read_text())["overlap"]
    assert stamped["in_sample"] and stamped["allowed"] and stamped["n_patients"] == 20
    # no default cohort
    done = subprocess.run(common + ["--config_file", "configs/evaluate.json", "--output_dir", str(out)], cwd=bundle_root,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "--datalist" in done.stderr


def test_cross_validation_api_without_output_dir(tmp_path):
    datalist, out = make_cohort(tmp_path, n_slides=20, n_patients=12)
    bags = bags_from_datalist(datalist, out / "features")
    splits = make_splits(bags, n_folds=3, seed=1)
    result = run_cross_validation(
        functools.partial(build_mil_network, "smile", embed_dim=16, attention_dim=8), bags, splits,
        TrainSettings(epochs=3, **FAST), n_bootstrap=50,
    )  # fmt: skip
    assert len(result.models) == 3 and len(result.predictions) == len(bags)
    assert {"slide_id", "prob", "fold", "threshold"} <= set(result.predictions[0])


def test_musk_npz(shared_mil):
    bags = bags_from_npz(shared_mil / "musk1.npz")
    assert len(bags) == 92 and sum(b.label for b in bags) == 47
    assert sum(b.features.shape[0] for b in bags) == 476 and bags[0].features.shape[1] == 166
