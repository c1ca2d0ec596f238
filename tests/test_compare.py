"""Method comparison, SMILE ablation and cross-centre transfer (configs/compare.json, an overlay on
configs/train.json), and the one-switch
method builder (scripts/networks/methods.py) used by configs/train.json."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from scripts.experiments.compare import holm, merge_predictions, paired_tests
from scripts.networks.methods import available_methods, build_method, method_arguments, resolve_method_kwargs

DIM = 32


def make_cohort(root, n_slides=30, n_patients=20, dim=DIM, seed=0, n_centers=3):
    """Feature files + datalist: ``n_centers`` centres (A, B, ...); positive slides hide 2 shifted instances
    among 10-18 noise ones."""
    rng = np.random.default_rng(seed)
    features = root / "out" / "features"
    features.mkdir(parents=True, exist_ok=True)
    direction = rng.normal(size=dim)
    direction *= 4.0 / np.linalg.norm(direction)
    rows = ["slide_id,path,label,patient_id,center"]
    for i in range(n_slides):
        patient = i % n_patients
        label = patient % 2
        x = rng.normal(size=(int(rng.integers(10, 18)), dim)).astype(np.float32)
        if label:
            x[rng.choice(len(x), 2, replace=False)] += direction
        with h5py.File(features / f"s{i:02d}.h5", "w") as handle:
            handle["features"] = x
        rows.append(f"s{i:02d},slides/s{i:02d}.tif,{label},p{patient:02d},c{'ABCDEFGH'[(patient // 2) % n_centers]}")
    (root / "datalist.csv").write_text("\n".join(rows) + "\n")
    return root / "datalist.csv", root / "out"


COMPARE_CONFIGS = "['configs/train.json','configs/compare.json']"


def bundle_run(bundle_root, *args, run_id=None, timeout=240):
    argv = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else [])
    argv += ["--config_file", COMPARE_CONFIGS, "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    done = subprocess.run(argv + list(args), cwd=bundle_root, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


FAST = ["--epochs", "12", "--batch_size", "4", "--lr", "0.001", "--optimizer_name", "adam", "--num_threads", "1",
        "--n_bootstrap", "100", "--paired_bootstrap", "300"]  # fmt: skip


def test_compare_ablation_transfer_bundle(tmp_path, bundle_root):
    """`run all`: comparison of 3 methods, a 2x2 ablation and the transfer matrix, through the real command."""
    datalist, out = make_cohort(tmp_path)
    bundle_run(
        bundle_root, "--datalist", str(datalist), "--output_dir", str(out), *FAST,
        "--methods", "['smile','abmil_gated','mean_pool']", "--thresholds", "[0.5,0.7]", "--factors", "[0.3,0.8]",
        run_id="all",
    )  # fmt: skip
    cmp_dir = out / "compare"
    # comparison
    rows = {r["method"]: r for r in read_csv(cmp_dir / "comparison.csv")}
    assert list(rows) == ["smile", "abmil_gated", "mean_pool", "pooled_logreg"] and all(r["status"] == "ok" for r in rows.values())
    assert rows["smile"]["ci_method"].startswith("patient bootstrap (stratified, 100)")
    pooled = [float(r["pooled_auc"]) for r in rows.values()]
    assert len(set(pooled)) > 1, pooled
    assert float(rows["smile"]["pooled_auc"]) > 0.75, rows["smile"]  # the sparse signal is learnt
    for method in ("abmil_gated", "mean_pool", "pooled_logreg"):
        for key in ("vs_smile_p_patient_bootstrap", "vs_smile_p_patient_bootstrap_holm", "vs_smile_p_delong_independent_slides"):
            assert 0.0 <= float(rows[method][key]) <= 1.0, (method, key, rows[method][key])
        assert float(rows[method]["vs_smile_p_patient_bootstrap_holm"]) >= float(rows[method]["vs_smile_p_patient_bootstrap"])
        assert int(rows[method]["vs_smile_patient_bootstrap_patients"]) == 20
    assert rows["smile"]["vs_smile_p_patient_bootstrap"] == ""  # no test of the reference against itself
    for r in rows.values():
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["auc_std"]) >= 0.0
    oof = read_csv(cmp_dir / "oof_predictions.csv")
    assert len(oof) == 30 and {"prob_smile", "prob_abmil_gated", "prob_mean_pool", "prob_pooled_logreg", "patient_id"} <= set(oof[0])
    assert len({row["prob_smile"] for row in oof}) > 5
    splits = json.loads((out / "splits.json").read_text())
    by_slide_fold = {row["slide_id"]: int(row["fold"]) for row in oof}
    for fold in splits["folds"]:
        assert all(by_slide_fold[s] == fold["fold"] for s in fold["test"])  # every method tested on the same folds
    for method in ("smile", "abmil_gated", "mean_pool"):  # (the pooled floor has no fold models)
        assert (cmp_dir / method / "cv" / "oof_predictions.csv").is_file()
        assert (cmp_dir / method / "cv" / "fold0" / "model.pt").is_file()
    markdown = (cmp_dir / "comparison.md").read_text()
    assert "| smile |" in markdown and "(reference)" in markdown
    assert "p, patient bootstrap (Holm)" in markdown and "p, DeLong (assumes independent slides)" in markdown
    assert "300 resamples, seed 0" in markdown
    assert "| pooled_logreg |" in markdown and "patient bootstrap (stratified, 100)" in markdown
    assert (cmp_dir / "roc.png").stat().st_size > 1000
    result = json.loads((cmp_dir / "comparison.json").read_text())
    assert set(result["paired"]) == {"abmil_gated", "mean_pool", "pooled_logreg"}
    assert result["paired_test"]["headline_p"] == "p_patient_bootstrap_holm" and result["paired_test"]["resamples"] == 300
    # ablation: 2 x 2 grid, same splits; SMILE at threshold 0.5 / factor 0.3 is another cell than the comparison's 0.5 / 0.5
    grid = read_csv(out / "ablation" / "ablation.csv")
    assert [(float(r["threshold"]), float(r["factor"])) for r in grid] == [(0.5, 0.3), (0.5, 0.8), (0.7, 0.3), (0.7, 0.8)]
    assert len({r["pooled_auc"] for r in grid}) > 1 and all(0.0 <= float(r["auc_mean"]) <= 1.0 for r in grid)
    assert (out / "ablation" / "ablation.png").stat().st_size > 1000
    chosen = json.loads((out / "ablation" / "ablation.json").read_text())["chosen_on_validation"]
    by_val = max(grid, key=lambda r: (float(r["val_auc_mean"]), -float(r["val_loss_mean"])))
    assert (chosen["threshold"], chosen["factor"]) == (float(by_val["threshold"]), float(by_val["factor"]))
    # transfer: 3 training centres x (3 test centres + other centres); diagonal = within-centre CV
    matrix = read_csv(out / "transfer" / "transfer.csv")
    assert [r["train_center"] for r in matrix] == ["cA", "cB", "cC"]
    assert {"cA", "cB", "cC", "other centres"} <= set(matrix[0])
    off = [float(r[c]) for r in matrix for c in ("cA", "cB", "cC") if c != r["train_center"] and r[c] != ""]
    assert len(off) == 6 and len(set(off)) > 1
    cells = read_csv(out / "transfer" / "transfer_long.csv")
    assert all("within-centre" in c["note"] for c in cells if c["train_center"] == c["test_center"])
    assert (out / "transfer" / "transfer.png").stat().st_size > 1000


def test_every_method_on_musk1(tmp_path, bundle_root, shared_mil):
    """Every registered method trains (run_cross_validation, via the comparison command) and scores on MUSK1."""
    out = tmp_path / "musk"
    bundle_run(
        bundle_root, "--data", str(shared_mil / "musk1.npz"), "--output_dir", str(out), "--methods", "all",
        "--n_folds", "2", "--epochs", "2", "--batch_size", "8", "--lr", "0.0005", "--optimizer_name", "adam",
        "--num_threads", "1", "--n_bootstrap", "50", "--paired_bootstrap", "100", "--keep_fold_models", "false",
    )  # fmt: skip
    rows = {r["method"]: r for r in read_csv(out / "compare" / "comparison.csv")}
    assert set(rows) == set(available_methods()) | {"pooled_logreg"}
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert int(row["n_slides"]) == 92 and 0.0 <= float(row["pooled_auc"]) <= 1.0
        if name != "smile":
            assert 0.0 <= float(row["vs_smile_p_delong_independent_slides"]) <= 1.0
            assert 0.0 <= float(row["vs_smile_p_patient_bootstrap"]) <= 1.0
    oof = read_csv(out / "compare" / "oof_predictions.csv")
    assert len(oof) == 92
    for name in rows:
        probs = np.array([float(r[f"prob_{name}"]) for r in oof])
        assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0
        assert (out / "compare" / name / "cv" / "oof_predictions.csv").is_file()
    assert len({r["pooled_auc"] for r in rows.values()}) > 3


def test_build_method_switch_and_train_json(bundle_root):
    """One switch in train.json builds every method; SMILE's knobs stay overridable; typos fail clearly."""
    from monai.bundle import ConfigParser

    for name in available_methods():
        parser = ConfigParser()
        parser.read_config(str(bundle_root / "configs" / "train.json"))
        parser["network_def"]["name"] = name
        parser["feature_dim"] = 16  # null (the default) = the features' size, set by the fold loop
        model = parser.get_parsed_content("network_def", instantiate=True).mil  # network_def: a BagClassifier
        assert model.in_dim == 16 and model.config["in_dim"] == 16
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train.json"))
    parser["network_def"]["factor"] = 0.3
    parser["feature_dim"] = 16
    smile = parser.get_parsed_content("network_def", instantiate=True).mil
    assert smile.factor == 0.3 and smile.threshold == 0.5 and smile.embed_dim == 256  # official defaults kept
    assert method_arguments("clam_sb")["k_sample"] == 8  # arguments passed on through **kwargs are known
    assert resolve_method_kwargs("clam_sb", {"k_sample": 4}, factor=None) == {"k_sample": 4}
    with pytest.raises(TypeError, match="does not take 'factor'.*k_sample"):
        build_method("clam_sb", in_dim=16, factor=0.3)
    with pytest.raises(KeyError, match="registered"):
        build_method("smiel")


def test_paired_tests_and_holm():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    good = labels + rng.normal(scale=0.6, size=80)
    noise = rng.normal(size=80)
    rows = [{"slide_id": f"s{i}", "patient_id": f"p{i // 2}", "center": "", "label": int(y), "fold": 0, "prob": float(p)}
            for i, (y, p) in enumerate(zip(labels, good))]  # fmt: skip
    other = [{**r, "prob": float(p)} for r, p in zip(rows, noise)]
    oof = merge_predictions({"smile": rows, "noise": other, "same": rows})
    tests = paired_tests(oof, "smile", ["smile", "noise", "same"], n_bootstrap=300)
    noise, same = tests["noise"], tests["same"]
    assert noise["auc_difference"] > 0.2 and noise["p_delong_independent_slides"] < 0.01 and noise["p_patient_bootstrap"] < 0.05
    assert same["p_delong_independent_slides"] == 1.0 and same["p_patient_bootstrap"] == 1.0
    assert noise["patient_bootstrap_patients"] == 40 and noise["patient_bootstrap_resamples"] == 300
    # Holm over the headline (patient bootstrap) p-values of the two comparisons
    assert [noise["p_patient_bootstrap_holm"], same["p_patient_bootstrap_holm"]] == pytest.approx(
        holm([noise["p_patient_bootstrap"], same["p_patient_bootstrap"]]))
    assert paired_tests(oof, "smile", ["smile", "noise"], n_bootstrap=300, seed=1)["noise"]["patient_bootstrap_seed"] == 1
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_compare_json_is_an_overlay_on_train_json(bundle_root):
    """compare.json holds only what comparison adds or changes; the training recipe, splits and paths come from
    train.json, so one override there reaches every method, grid cell and transfer model (they are trained by
    train.json's own train/validate sections: tests/test_one_trainer.py)."""
    from monai.bundle import ConfigParser

    train = json.loads((bundle_root / "configs" / "train.json").read_text())
    overlay = json.loads((bundle_root / "configs" / "compare.json").read_text())
    repeated = [k for k, v in overlay.items() if train.get(k.lstrip("+")) == v]
    assert not repeated, f"compare.json repeats train.json: {repeated}"
    recipe = {"bundle_root", "datalist", "output_dir", "features_dir", "splits", "device", "n_folds", "val_fraction",
              "seed", "epochs", "batch_size", "optimizer_name", "lr", "weight_decay", "patience", "monitor",
              "num_workers", "num_threads", "n_bootstrap", "optimizer", "loss", "cv_splits", "train", "validate"}  # fmt: skip
    assert not recipe & set(overlay), recipe & set(overlay)
    parser = ConfigParser()
    parser.read_config([str(bundle_root / "configs" / "train.json"), str(bundle_root / "configs" / "compare.json")])
    parser["lr"], parser["epochs"], parser["data"] = 0.0123, 7, "musk1.npz"  # as --lr / --epochs / --data would
    for key in ("comparison", "ablation_grid", "transfer_matrix"):
        assert "settings" not in parser.get_parsed_content(key).keywords  # no second copy of the recipe
    from scripts.workflows.training import training_description

    recipe = training_description(parser)  # what every fold of them is trained with, and reports
    assert recipe["epochs"] == 7 and recipe["optimizer"]["lr"] == 0.0123 and recipe["feature_norm"] == "standardize"
    assert parser["run"] == "@comparing" and parser["bags"]["_target_"] == "scripts.experiments.compare.load_bags"
    assert parser["training"] == train["training"]  # train.json's own workflows stay reachable


def test_comparison_smile_row_reproduces_the_training_workflow(tmp_path, bundle_root):
    """Through the overlay the comparison's SMILE is train.json's: same splits, recipe, seeds and per-fold
    feature standardisation give the same out-of-fold probabilities as `run training` (docs/compare.md)."""
    datalist, out = make_cohort(tmp_path, n_slides=24, n_patients=16)
    common = ["--datalist", str(datalist), "--output_dir", str(out), "--n_folds", "2", "--epochs", "3", "--batch_size", "4",
              "--lr", "0.001", "--optimizer_name", "adam", "--num_threads", "1", "--n_bootstrap", "20"]  # fmt: skip
    # compare.json standardises features per fold by default; train.json does when asked: the same transform
    train = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", *common,
             "--feature_norm", "standardize"]
    done = subprocess.run(train, cwd=bundle_root, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    bundle_run(bundle_root, *common, "--methods", "['smile']", "--floor", "false", "--paired_bootstrap", "20")
    trained = {r["slide_id"]: float(r["prob"]) for r in read_csv(out / "cv" / "oof_predictions.csv")}
    compared = {r["slide_id"]: float(r["prob"]) for r in read_csv(out / "compare" / "smile" / "cv" / "oof_predictions.csv")}
    assert len(trained) == 24 and set(compared) == set(trained)
    assert len(set(trained.values())) > 4  # real, varied predictions
    comparison = json.loads((out / "compare" / "comparison.json").read_text())
    assert comparison["settings"]["feature_norm"] == "standardize" and comparison["rows"][0]["feature_norm"] == "standardize"
    assert "standardised per fold" in (out / "compare" / "comparison.md").read_text()
    for slide, prob in trained.items():
        assert compared[slide] == pytest.approx(prob, abs=1e-6), slide
