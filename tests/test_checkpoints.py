"""scripts.formats.checkpoints: the one home of fold checkpoints; nothing in a checkpoint can run code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.formats.checkpoints import (
    CheckpointError,
    UntrustedCheckpointError,
    load_into_network,
    read_checkpoint,
    resolve_checkpoints,
    save_checkpoint,
    trust_requested,
)
from scripts.networks.bag_classifier import BagClassifier
from scripts.networks.methods import build_from_checkpoint, build_method, network_spec
from scripts.utils.errors import BundleError


class _WritesMarker:
    """Unpickling this object would create ``self.path`` (stands in for arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _poisoned_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran.txt"
    model = build_method("smile", in_dim=8)
    path = tmp_path / "poisoned.pt"
    torch.save({"model": model.state_dict(), "network": {"name": "smile"}, "extra": _WritesMarker(str(marker))}, path)
    assert not marker.exists()
    return path, marker


def test_checkpoint_with_pickled_object_is_refused_without_running_it(tmp_path):
    path, marker = _poisoned_checkpoint(tmp_path)
    net = BagClassifier(build_method("smile", in_dim=8))
    for load in (lambda: read_checkpoint(path, trust=False), lambda: build_from_checkpoint(path, trust=False),
                 lambda: load_into_network(path, net, trust=False)):
        with pytest.raises(UntrustedCheckpointError) as info:
            load()
        assert isinstance(info.value, BundleError)
        assert str(path) in str(info.value) and "--trust_checkpoint true" in str(info.value)
        assert not marker.exists()
    # the override really unpickles it (so the refusal above is what kept the code from running)
    read_checkpoint(path, trust=True)
    assert marker.exists()


def test_refusal_from_the_command_line_and_override(tmp_path):
    path, marker = _poisoned_checkpoint(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "SMILE_TRUST_CHECKPOINT"}
    env["PYTHONPATH"] = str(root)
    cmd = [sys.executable, "-m", "scripts.workflows.publish_model", "--checkpoint", str(path), "--out", str(tmp_path / "m.pt")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "refused to load checkpoint" in proc.stderr and str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    assert trust_requested(["x", "--trust_checkpoint", "true"]) and not trust_requested(["x", "--trust_checkpoint", "false"])


def test_fold_checkpoint_round_trip_is_weights_only(tmp_path):
    model = build_method("smile", in_dim=8, factor=0.3).eval()
    path = save_checkpoint(tmp_path / "fold0" / "model.pt", model, metadata={"encoder": "ctranspath", "ids": ("a", "b")},
                           network=network_spec(model), fold=0, threshold=0.4)
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["metadata"] == {"encoder": "ctranspath", "ids": ["a", "b"]} and raw["threshold"] == 0.4
    again, checkpoint = build_from_checkpoint(path)
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = model.forward_packed(x, torch.zeros(5, dtype=torch.long), 1)["logits"]
        out = again.forward_packed(x, torch.zeros(5, dtype=torch.long), 1)["logits"]
    torch.testing.assert_close(ref, out)
    assert checkpoint["network"]["kwargs"]["factor"] == 0.3
    # into network_def: same settings load; other settings are refused with the differing setting named
    loaded, extras = load_into_network(path, BagClassifier(build_method("smile", in_dim=8, factor=0.3)))
    assert extras["fold"] == 0 and "model" not in extras
    with pytest.raises(CheckpointError, match="factor: trained 0.3 vs config 0.5"):
        load_into_network(path, BagClassifier(build_method("smile", in_dim=8)))
    assert resolve_checkpoints(tmp_path) == [path]
