"""Reduced runs of the benchmark commands (full figures are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scripts.benchmarks.mil import run_benchmark, standardized
from scripts.data.bags import Bag


@pytest.mark.slow
def test_musk1_quick_benchmark(shared_mil):
    """5-fold x 1 repeat of MUSK1 with the default protocol (the docs use 10-fold x 5, 100 epochs):
    SMILE with Ilse et al.'s MUSK embedding on standardised features learns the data set."""
    result = run_benchmark(str(shared_mil / "musk1.npz"), method="smile", folds=5, repeats=1, epochs=60, progress=False)
    assert result["feature_dim"] == 166 and result["n_bags"] == 92
    assert result["network_kwargs"]["hidden_dims"] == [256, 128] and result["network_kwargs"]["input_norm"] == "none"
    assert result["settings"]["standardize"] and result["settings"]["arch"] == "ilse"
    assert len(result["accuracy_per_fold"]) == 5
    assert result["accuracy_mean"] >= 0.8, result["accuracy_per_fold"]
    assert result["auc_mean"] >= 0.85
    floor = result["floor"]  # the pooled logistic-regression floor on the same folds, with the paired test
    assert len(floor["accuracy_per_repeat"]) == 1 and 0.7 <= floor["accuracy_mean"] <= 1.0 and floor["auc_mean"] > 0.8
    test = floor["paired_bootstrap"]
    assert test["ci"][0] <= test["difference"] <= test["ci"][1] and 0.0 <= test["p_value"] <= 1.0


def test_standardized_uses_training_bags_only():
    """Per-fold standardisation: statistics of the named training bags only, applied to every bag."""
    train = [Bag("a", 0, "a", features=torch.tensor([[0.0, 10.0], [2.0, 30.0]])),
             Bag("b", 1, "b", features=torch.tensor([[4.0, 20.0]]))]  # fmt: skip
    test = Bag("t", 1, "t", features=torch.tensor([[1000.0, -1000.0]]))
    out = standardized(train + [test], ["a", "b"])
    x = torch.cat([b.features for b in out[:2]])
    assert torch.allclose(x.mean(0), torch.zeros(2), atol=1e-6) and torch.allclose(x.std(0), torch.ones(2))
    assert torch.allclose(out[2].features, (test.features - torch.tensor([2.0, 20.0])) / torch.tensor([2.0, 10.0]))
    assert train[0].features[0, 0] == 0.0  # the input bags are not modified


def test_benchmark_commands_run(tmp_path, shared_mil, bundle_root):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "scripts.benchmarks.mil", "--data", str(shared_mil / "musk1.npz"), "--method", "smile",
           "--folds", "3", "--repeats", "1", "--epochs", "2", "--factor", "1.0", "--progress", "False", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=bundle_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"accuracy_mean", "accuracy_sem", "auc_mean"} <= set(result) and result["network_kwargs"]["factor"] == 1.0
    assert result["settings"]["early_stopping"].startswith("none")
    assert "floor (mean+max pooled" in done.stdout and "paired bootstrap" in done.stdout
    cmd = [sys.executable, "-m", "scripts.benchmarks.train_speed", "--bags", "6", "--instances", "50", "--dim", "16",
           "--batch_size", "3", "--devices", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, cwd=bundle_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bags/s" in done.stdout and "peak host RSS" in done.stdout
