"""Reduced runs of the benchmark commands (full figures are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts.benchmarks.mil import run_benchmark


@pytest.mark.slow
def test_musk1_quick_benchmark(shared_mil):
    """5-fold x 1 repeat of MUSK1 (the docs use 10-fold x 5): SMILE learns the data set."""
    result = run_benchmark(str(shared_mil / "musk1.npz"), method="smile", folds=5, repeats=1, epochs=60, progress=False)
    assert result["feature_dim"] == 166 and result["n_bags"] == 92
    assert len(result["accuracy_per_fold"]) == 5
    assert result["accuracy_mean"] >= 0.75, result["accuracy_per_fold"]
    assert result["auc_mean"] >= 0.8


def test_benchmark_commands_run(tmp_path, shared_mil, bundle_root):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "scripts.benchmarks.mil", "--data", str(shared_mil / "musk1.npz"), "--method", "smile",
           "--folds", "3", "--repeats", "1", "--epochs", "2", "--factor", "1.0", "--progress", "False", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=bundle_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"accuracy_mean", "accuracy_sem", "auc_mean"} <= set(result) and result["network_kwargs"] == {"factor": 1.0}
    cmd = [sys.executable, "-m", "scripts.benchmarks.train_speed", "--bags", "6", "--instances", "50", "--dim", "16",
           "--batch_size", "3", "--devices", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, cwd=bundle_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bags/s" in done.stdout and "peak host RSS" in done.stdout
