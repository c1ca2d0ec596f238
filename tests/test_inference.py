"""configs/inference.json through the real `python -m monai.bundle run` command.

The slide -> features stages are tested by their own modules; here the features are synthetic HDF5
files (one for the real CMU H&E region, one features-only row) and the models are small training-style
fold checkpoints, so the test checks the ensemble, the outputs and the per-slide failure handling.
"""

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

from scripts.inference import SlideInference, load_checkpoint_model, predict_bag, resolve_checkpoints
from scripts.networks.bag_classifier import BagClassifier

pytest.importorskip("scripts.networks.smile")


def _fold_checkpoints(cv_dir, n=3, thresholds=(0.3, 0.5, 0.7)):
    from scripts.networks.smile import SMILE

    for k in range(n):
        torch.manual_seed(k)
        net = SMILE(in_dim=768)
        with torch.no_grad():
            net.classifier.bias.fill_(0.5 * k)
        path = cv_dir / f"fold{k}" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": net.state_dict(), "network": {"name": "smile", "class": "scripts.networks.smile.SMILE",
                                                          "kwargs": net.config}, "fold": k, "threshold": thresholds[k]}, path)


def _features(path, coords, seed, patch_size_level0=256):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=rng.standard_normal((len(coords), 768)).astype(np.float32))
        handle.create_dataset("coords", data=np.asarray(coords, np.int64))
        handle.attrs["patch_size_level0"] = patch_size_level0
        handle.attrs["patch_size"] = 256


def test_inference_cli_on_cmu_region(shared_slides, tmp_path, bundle_root):
    slide = shared_slides / "cmu-1-small-region.svs"  # 2220 x 2967, 0.499 um/px: a 256-px patch is 256 level-0 px
    xs, ys = np.meshgrid(np.arange(0, 2220 - 256, 256), np.arange(0, 2967 - 256, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    _features(tmp_path / "cmu.h5", coords, 0)
    _features(tmp_path / "bag_only.h5", coords[:7], 1)
    _features(tmp_path / "broken.h5", coords[:0], 2)  # no patches: must fail alone
    with open(tmp_path / "datalist.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["slide_id", "path", "label", "patient_id", "center", "features"])
        w.writerow(["cmu", str(slide), "", "p1", "c1", "cmu.h5"])
        w.writerow(["bag_only", "", "", "p2", "c1", "bag_only.h5"])
        w.writerow(["empty", "", "", "p3", "c1", "broken.h5"])
    _fold_checkpoints(tmp_path / "train" / "cv")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(bundle_root))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--datalist", str(tmp_path / "datalist.csv"), "--output_dir", str(out),
           "--checkpoints", str(tmp_path / "train" / "cv"), "--top_k", "4"]
    proc = subprocess.run(cmd, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "cmu: P(STAS)=" in log and "mil" in log and "outputs" in log

    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert set(rows) == {"cmu", "bag_only", "empty"}
    assert rows["cmu"]["status"] == "ok" and rows["bag_only"]["status"] == "ok"
    assert rows["empty"]["status"] == "failed" and "at least one patch" in rows["empty"]["error"]
    assert int(rows["cmu"]["n_patches"]) == len(coords) and int(rows["cmu"]["n_models"]) == 3
    assert float(rows["cmu"]["threshold"]) == pytest.approx(0.5)  # mean of the folds' thresholds
    p = float(rows["cmu"]["probability"])
    assert 0 < p < 1 and int(rows["cmu"]["predicted_label"]) == int(p >= 0.5)

    # the ensemble is the mean of the fold probabilities
    models = [load_checkpoint_model(c, BagClassifier("smile"))[0] for c in resolve_checkpoints(tmp_path / "train" / "cv")]
    with h5py.File(tmp_path / "cmu.h5") as handle:
        feats = torch.from_numpy(handle["features"][()])
    expected, attention, per_model = predict_bag(models, feats)
    assert p == pytest.approx(expected, abs=1e-5)
    assert len(set(round(q, 6) for q in per_model)) == 3

    with h5py.File(out / "attention" / "cmu.h5") as handle:
        np.testing.assert_array_equal(handle["coords"][()], coords)
        np.testing.assert_allclose(handle["attention"][()], attention, rtol=1e-4)
        assert handle["attention"][()].sum() == pytest.approx(1.0, abs=1e-4)
    for name in ("heatmaps/cmu.png", "heatmaps/cmu_topk.png", "geojson/cmu.geojson", "attention/bag_only.h5",
                 "geojson/bag_only.geojson", "inference_timings.csv"):
        assert (out / name).is_file(), name
    geo = json.loads((out / "geojson" / "cmu.geojson").read_text())
    assert len(geo["features"]) == len(coords)
    for feature in geo["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 2220 and ring[:, 1].min() >= 0 and ring[:, 1].max() <= 2967


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoints(tmp_path / "nothing.pt")
    (tmp_path / "empty_cv").mkdir()
    with pytest.raises(ValueError, match="fold\\*/model.pt"):
        resolve_checkpoints(tmp_path / "empty_cv")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint_model(tmp_path / "wrong.pt", BagClassifier("smile"))


def test_missing_features_without_stages_fails_per_slide(tmp_path):
    from scripts.datalist import SlideRecord

    workflow = SlideInference([SlideRecord("s1", None, None, "p", "c")], BagClassifier("smile"), None, [], tmp_path)
    workflow.threshold = 0.5
    result = workflow.run_slide(SlideRecord("s1", None, None, "p", "c"))
    assert result.status == "failed" and "no features for slide s1" in result.error
