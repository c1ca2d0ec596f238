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

from scripts.inference import INFERENCE_CONFIGS, SlideInference, load_checkpoint_model, predict_bag, resolve_checkpoints
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
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFERENCE_CONFIGS,
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


@pytest.mark.slow
def test_raw_slides_end_to_end(shared_slides, tmp_path, bundle_root):
    """Raw slides (one synthetic demo TIFF and the real CMU region) through tissue, grid, random-weight
    CTransPath and a 2-fold SMILE ensemble; every output written and the GeoJSON inside each slide."""
    pytest.importorskip("scripts.preprocess")
    pytest.importorskip("scripts.extract")
    from scripts.demo_cohort import make_demo_cohort

    cohort = make_demo_cohort(tmp_path / "cohort", n_slides=1, n_patients=1, size_um=512, seed=3, show_progress=False)
    rows = list(csv.DictReader(open(cohort)))
    datalist = tmp_path / "datalist.csv"
    with open(datalist, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["slide_id", "path", "label", "patient_id", "center", "annotations"])
        w.writerow([rows[0]["slide_id"], str(cohort.parent / rows[0]["path"]), "1", "p1", "c1",
                    str(cohort.parent / rows[0]["annotations"])])
        w.writerow(["cmu", str(shared_slides / "cmu-1-small-region.svs"), "", "p2", "c2", ""])
        w.writerow(["broken", str(shared_slides / "broken.svs"), "", "p3", "c3", ""])
    _fold_checkpoints(tmp_path / "cv", n=2, thresholds=(0.4, 0.6))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFERENCE_CONFIGS,
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--datalist", str(datalist), "--output_dir", str(out), "--checkpoints", str(tmp_path / "cv"),
           "--allow_random_weights", "true", "--num_workers", "1", "--top_k", "4",
           "--mask_backend", "scipy"]  # scipy: the same mask without ITK's ~15 s of module loading
    proc = subprocess.run(cmd, cwd=bundle_root, env=dict(os.environ, PYTHONPATH=str(bundle_root)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for stage in ("read", "tissue", "grid", "features", "mil", "outputs"):
        assert f"{stage} " in log
    results = {r["slide_id"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert results["broken"]["status"] == "failed" and results["broken"]["error"]
    # the demo slide's planted-lesion annotations: localisation outputs for it alone
    localisation = json.loads((out / "localisation_summary.json").read_text())
    assert localisation["n_slides"] == 1 and localisation["slides"] == [rows[0]["slide_id"]]
    assert (out / "localisation" / f"{rows[0]['slide_id']}.csv").is_file()
    sizes = {"cmu": (2220, 2967)}
    import openslide

    for slide_id in (rows[0]["slide_id"], "cmu"):
        assert results[slide_id]["status"] == "ok", results[slide_id]
        n = int(results[slide_id]["n_patches"])
        assert n > 0
        for name in (f"heatmaps/{slide_id}.png", f"heatmaps/{slide_id}_topk.png", f"attention/{slide_id}.h5"):
            assert (out / name).is_file()
        width, height = sizes.get(slide_id) or openslide.OpenSlide(str(cohort.parent / rows[0]["path"])).dimensions
        features = json.loads((out / "geojson" / f"{slide_id}.geojson").read_text())["features"]
        assert len(features) == n
        for feature in features:
            ring = np.asarray(feature["geometry"]["coordinates"][0])
            assert 0 <= ring[:, 0].min() and ring[:, 0].max() <= width
            assert 0 <= ring[:, 1].min() and ring[:, 1].max() <= height


def test_subset_datalist(tmp_path, shared_slides):
    from scripts.datalist import load_datalist
    from scripts.inference import subset_datalist

    src = tmp_path / "d.csv"
    src.write_text("slide_id,path,label,patient_id,center\n" + "".join(
        f"s{i},{shared_slides / 'cmu-1-small-region.svs'},{i % 2},p{i},c\n" for i in range(5)))
    subset_datalist(str(src), str(tmp_path / "sub.csv"), n_slides=2,
                    add=[str(shared_slides / "cmu-1-small-region.svs"), str(tmp_path / "missing.svs")])
    records = load_datalist(tmp_path / "sub.csv", require_labels=False)
    assert [r.slide_id for r in records] == ["s0", "s1", "cmu-1-small-region"]


def test_inference_json_is_an_overlay_on_preprocess_and_extract(bundle_root):
    """inference.json repeats no block of preprocess.json / extract.json: their tissue, reader, patch-grid and
    encoder blocks (and every override they take) are what inference runs; inference.json alone still builds
    network_def (what the Model Zoo tools load)."""
    import ast

    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    configs = bundle_root / "configs"
    overlay = json.loads((configs / "inference.json").read_text())
    for base in ("preprocess.json", "extract.json"):
        shared = json.loads((configs / base).read_text())
        repeated = sorted(k for k, v in overlay.items() if k in shared and shared[k] == v)
        # ids the Model Zoo's infer property check resolves on inference.json alone
        assert set(repeated) <= {"bundle_root", "datalist", "output_dir"}, f"inference.json repeats {base}: {repeated}"
    for block in ("tissue", "reader", "open_transform", "tissue_transform", "grid_transform", "slide_transforms",
                  "settings", "encoder", "encoder_weights", "patch_size", "target_mpp", "backends"):
        assert block not in overlay, block
    parser = ConfigParser()
    parser.read_config([str(bundle_root / p) for p in ast.literal_eval(INFERENCE_CONFIGS)])
    parser.update({"bundle_root": str(bundle_root), "patch_size": 128, "tissue#min_saturation": 40,
                   "allow_random_weights": True, "encoder_weights": "/nonexistent.pth", "encoder_name": "ctranspath"})
    stage = parser.get_parsed_content("patch_stage")
    assert stage.settings.patch_size == 128 and stage.settings.tissue.min_saturation == 40  # preprocess.json's blocks
    assert isinstance(stage.settings.transforms, Compose)
    assert stage.settings.transforms.transforms[2].patch_size == 128
    assert stage.settings.transforms.transforms[0].reader is parser.get_parsed_content("reader")
    assert tuple(parser.get_parsed_content("reader").backends) == tuple(json.loads((configs / "preprocess.json").read_text())["backends"])
    encoder = parser.get_parsed_content("feature_stage").encoder_factory  # extract.json's encoder, built lazily
    assert callable(encoder) and encoder.keywords["name"] == "ctranspath" and encoder.keywords["weights"] == "/nonexistent.pth"
    alone = ConfigParser()
    alone.read_config(str(configs / "inference.json"))
    alone["bundle_root"] = str(bundle_root)
    assert isinstance(alone.get_parsed_content("network_def"), BagClassifier)
