"""configs/multi_gpu_train.json: two torchrun processes (gloo on the CPU) train the cross-validation with
DDP and a DistributedSampler; only rank 0 writes. Same command as on N GPUs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("scripts.workflows.training")


def _cohort(root, n_slides=40, seed=0):
    rng = np.random.default_rng(seed)
    features = root / "features"
    features.mkdir(parents=True)
    datalist = root / "datalist.csv"
    with open(datalist, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["slide_id", "path", "label", "patient_id", "center", "features"])
        for i in range(n_slides):
            label = i % 2
            n = int(rng.integers(6, 14))
            x = rng.standard_normal((n, 768)).astype(np.float32)
            x[:2, :16] += 3.0 * label  # a few "lesion" patches carry the label
            path = features / f"s{i}.h5"
            with h5py.File(path, "w") as h5:
                h5["features"] = x
                h5["coords"] = np.zeros((n, 2), np.int64)
            w.writerow([f"s{i}", "", label, f"p{i}", f"c{i % 3}", str(path)])
    return datalist


@pytest.mark.slow
def test_two_process_training(tmp_path, bundle_root):
    datalist = _cohort(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "training",
           "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--datalist", str(datalist), "--output_dir", str(out),
           "--epochs", "3", "--n_folds", "2", "--n_bootstrap", "20", "--batch_size", "4"]
    env = dict(os.environ, PYTHONPATH=str(bundle_root), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "rank 0 of 2 (gloo)" in log and "rank 1 of 2 (gloo)" in log
    assert log.count("cross-validation: mean AUC") == 1  # rank 0 reports, rank 1 does not

    cv = out / "cv"
    for k in (0, 1):
        assert (cv / f"fold{k}" / "model.pt").is_file()
    summary = json.loads((cv / "summary.json").read_text())
    assert len(summary["folds"]) == 2 and summary["n_slides"] == 40
    assert json.loads((out / "splits.json").read_text())["folds"]
    # nothing half-written or written twice: no temporary files left anywhere
    assert not [p for p in out.rglob(".*tmp*")]
    checkpoint = torch.load(cv / "model.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith(("module.", "network.")) for k in checkpoint["model"])  # the bare network, unwrapped


def test_single_process_helpers_are_no_ops():
    from torch import nn

    from scripts.utils.distributed import PackedForward, init_distributed, is_main_process, unwrap, world_size, wrap_ddp

    assert world_size() == 1 and is_main_process()
    assert init_distributed().type in ("cpu", "cuda")
    net = nn.Linear(2, 1)
    assert wrap_ddp(net, torch.device("cpu")) is net
    assert unwrap(PackedForward(net)) is net
