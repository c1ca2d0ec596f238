"""configs/train.json is the training pipeline: every fold instantiates train#trainer, validate#evaluator
and their handlers from the config, so a handler added in JSON runs in every fold; TensorBoard events per
fold; --tracking mlflow leaves a local MLflow store with per-epoch metrics of every fold."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from test_mil_training import make_cohort

EPOCHS = 3


@pytest.mark.slow
def test_handlers_from_json_run_in_every_fold_with_tracking(tmp_path, bundle_root):
    datalist, out = make_cohort(tmp_path, n_slides=24, n_patients=16)
    extra = tmp_path / "extra_handler.json"
    # a MONAI handler added by an overlay config, nothing else: it must run in every fold
    extra.write_text(json.dumps({"+train#handlers": [{
        "_target_": "CheckpointSaver", "save_dir": "$@fold_dir + '/extra'", "save_dict": {"model": "@train#network"},
        "save_final": True, "final_filename": "final.pt"}]}))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", f"['configs/train.json','{extra}']", "--meta_file", "configs/metadata.json",
           "--datalist", str(datalist), "--output_dir", str(out), "--epochs", str(EPOCHS), "--n_folds", "2",
           "--n_bootstrap", "20", "--batch_size", "4", "--num_threads", "1", "--patience", "50",
           "--network_def#embed_dim", "16", "--network_def#attention_dim", "8", "--tracking", "mlflow"]
    env = dict(os.environ, PYTHONPATH=str(bundle_root), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    cv = out / "cv"
    for k in (0, 1):
        fold = cv / f"fold{k}"
        assert (fold / "extra" / "final.pt").is_file(), f"the JSON-added handler did not run in fold {k}"
        assert list((fold / "tensorboard").glob("events.out.tfevents.*")), f"no TensorBoard events in fold {k}"
        assert (fold / "checkpoints" / "best_model.pt").is_file()  # CheckpointSaver on the selection
        rows = list(csv.DictReader(open(fold / "history.csv")))
        assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
        # val_auc is NaN when a small validation set holds one class; the loss is always there
        assert all(float(r["val_loss"]) > 0 and float(r["train_loss"]) > 0 for r in rows), rows
    summary = json.loads((cv / "summary.json").read_text())
    assert len(summary["folds"]) == 2 and summary["settings"]["epochs"] == EPOCHS

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    runs = {r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert {"fold0", "fold1"} <= set(runs)
    assert all({"val_auc", "train_loss"} <= set(runs[name].data.metrics) for name in ("fold0", "fold1"))
    for name in ("fold0", "fold1"):
        for metric in ("train_epoch_loss", "val_loss"):
            steps = sorted(m.step for m in client.get_metric_history(runs[name].info.run_id, metric))
            assert steps == list(range(1, EPOCHS + 1)), (name, metric, steps)


def test_network_def_is_a_module_in_every_config(bundle_root, monkeypatch):
    import warnings

    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(bundle_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for config in ("configs/train.json", "configs/inference.json"):
            verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file=config, any=7,
                              device="cpu")
