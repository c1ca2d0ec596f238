"""One fold trainer (issue 19 item 1): the comparison, the ablation and the transfer train every model through
train.json's own train/validate sections (scripts.workflows.training.train_from_config), so a handler or setting added
to the config in JSON reaches each of them, as it reaches `run training`."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from test_compare import make_cohort  # noqa: E402 (the comparison tests' synthetic cohort)

from scripts.networks.methods import method_config_overrides

DIM = 16
EPOCHS = 3

# a handler the project does not have: one JSON line per finished training run
COUNTER = textwrap.dedent('''
    import json

    from ignite.engine import Events


    class CountEpochs:
        def __init__(self, path, run_name=None, fold_dir=None):
            self.path, self.run_name, self.fold_dir, self.epochs = path, run_name, fold_dir, 0

        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
            engine.add_event_handler(Events.COMPLETED, self.completed)

        def epoch_completed(self, engine):
            self.epochs += 1

        def completed(self, engine):
            record = {"run_name": self.run_name, "fold_dir": self.fold_dir, "epochs": self.epochs,
                      "n_train": len(engine.data_loader.dataset)}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\\n")
''')


def two_centre_cohort(root, n_slides=24, n_patients=16, seed=0):
    """The comparison tests' cohort with 2 centres of 8 patients (half positive)."""
    return make_cohort(root, n_slides=n_slides, n_patients=n_patients, dim=DIM, seed=seed, n_centers=2)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_json_handler_and_val_interval_reach_every_comparison_ablation_and_transfer_model(tmp_path, bundle_root):
    datalist, out = two_centre_cohort(tmp_path)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "fold_counter.py").write_text(COUNTER)
    counts = tmp_path / "counts.jsonl"
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({
        "+train#handlers": [{"_target_": "fold_counter.CountEpochs", "path": str(counts), "run_name": "@run_name",
                             "fold_dir": "@fold_dir"}],
        "val_interval": 2,  # a train.json setting changed in JSON: validate on even epochs only
    }))  # fmt: skip
    configs = f"['configs/train.json','configs/compare.json','{overlay}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "all", "--config_file", configs, "--meta_file", "configs/metadata.json",
           "--datalist", str(datalist), "--output_dir", str(out), "--n_folds", "2", "--epochs", str(EPOCHS),
           "--batch_size", "4", "--lr", "0.001", "--optimizer_name", "adam", "--num_threads", "1", "--n_bootstrap", "20",
           "--paired_bootstrap", "20", "--methods", "['smile','mean_pool']", "--floor", "false",
           "--thresholds", "[0.5]", "--factors", "[0.3,0.8]", "--transfer_cv_folds", "2"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "mods"), str(bundle_root)]), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    records = [json.loads(line) for line in counts.read_text().splitlines()]
    runs = {r["run_name"]: r for r in records}
    assert len(runs) == len(records), "a run name was trained twice"
    assert all(r["epochs"] == EPOCHS and r["n_train"] > 0 for r in records), records

    # comparison: every fold of every method, in the fold's own folder
    for method in ("smile", "mean_pool"):
        for k in (0, 1):
            record = runs.pop(f"{method}/fold{k}")
            assert record["fold_dir"] == str(out / "compare" / method / "cv" / f"fold{k}")
            history = read_csv(out / "compare" / method / "cv" / f"fold{k}" / "history.csv")
            validated = [int(h["epoch"]) for h in history if not math.isnan(float(h["val_loss"]))]
            assert validated == [2], history  # val_interval from the overlay
            assert list((out / "compare" / method / "cv" / f"fold{k}" / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "compare" / "smile" / "cv" / "summary.json").read_text())
    assert {f["best_epoch"] for f in summary["folds"]} == {2}  # selection saw only the validated epoch
    comparison = json.loads((out / "compare" / "comparison.json").read_text())
    assert comparison["settings"]["val_interval"] == 2 and comparison["settings"]["epochs"] == EPOCHS
    assert [r["status"] for r in comparison["rows"]] == ["ok", "ok"]

    # ablation: every fold of both grid cells (temporary fold folders: no fold models are kept)
    for factor in ("0.3", "0.8"):
        for k in (0, 1):
            record = runs.pop(f"threshold0.5_factor{factor}/fold{k}")
            assert not os.path.exists(record["fold_dir"])
    grid = read_csv(out / "ablation" / "ablation.csv")
    assert [(r["threshold"], r["factor"]) for r in grid] == [("0.5", "0.3"), ("0.5", "0.8")]
    assert not (out / "ablation" / "cv").exists()

    # transfer: one model per training centre, plus the folds of its within-centre CV (the diagonal)
    for centre in ("cA", "cB"):
        runs.pop(f"smile/{centre}")
    cells = read_csv(out / "transfer" / "transfer_long.csv")
    diagonal = {c["train_center"]: c for c in cells if c["train_center"] == c["test_center"]}
    assert set(diagonal) == {"cA", "cB"}
    for centre, cell in diagonal.items():
        assert "within-centre 2-fold CV" in cell["note"], cell
        for k in (0, 1):
            runs.pop(f"smile/{centre}/cv/fold{k}")
    matrix = read_csv(out / "transfer" / "transfer.csv")
    assert [r["train_center"] for r in matrix] == ["cA", "cB"] and all(r["best_epoch"] == "2" for r in matrix)
    assert not runs, f"trainings that belong to no stage: {sorted(runs)}"


def test_method_overrides_choose_the_network_and_ignore_other_network_def_settings():
    network_def = {"_target_": "scripts.networks.methods.build_bag_classifier", "name": "smile", "in_dim": "@feature_dim",
                   "embed_dim": 64, "attention_dim": None, "threshold": None, "factor": 0.3, "network_kwargs": {},
                   "channel_first": True}  # fmt: skip
    smile = method_config_overrides("smile", {"threshold": 0.5, "factor": 0.5, "dropout": 0.1}, network_def)
    assert smile == {"network_def#name": "smile", "network_def#embed_dim": None, "network_def#attention_dim": None,
                     "network_def#threshold": 0.5, "network_def#factor": 0.5,
                     "network_def#network_kwargs": {"dropout": 0.1}}  # fmt: skip
    # clam_sb takes no factor: the config's --network_def#factor 0.3 is reset to null, not passed on
    clam = method_config_overrides("clam_sb", {"k_sample": 4}, network_def)
    assert clam["network_def#factor"] is None and clam["network_def#network_kwargs"] == {"k_sample": 4}
    with pytest.raises(TypeError, match="does not take 'factor'"):
        method_config_overrides("clam_sb", {"factor": 0.3}, network_def)  # a typo fails before any training


def test_python_callers_pass_a_parser_and_get_a_clear_error_for_settings(tmp_path):
    from scripts.experiments.ablation import run_ablation
    from scripts.experiments.compare import compare_methods
    from scripts.experiments.transfer import run_transfer
    from scripts.workflows.training import TrainSettings, training_parser

    with pytest.raises(TypeError, match="output_dir must be a folder.*parser="):
        compare_methods([], {"folds": []}, TrainSettings(), methods=["smile"])
    with pytest.raises(TypeError, match="output_dir must be a folder"):
        run_ablation([], {"folds": []}, TrainSettings())
    with pytest.raises(TypeError, match="output_dir must be a folder"):
        run_transfer([], TrainSettings())
    with pytest.raises(RuntimeError, match="pass parser="):
        compare_methods([], {"folds": []}, tmp_path, methods=["smile"])
    with pytest.raises(KeyError, match="'epoch' is not a key"):
        training_parser({"epoch": 3})
    assert training_parser(TrainSettings(epochs=3).config_overrides())["epochs"] == 3
