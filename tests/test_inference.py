"""configs/inference.json, alone, through the real `python -m monai.bundle run` command and through the
public per-slide API (scripts.workflows.predict.predict_slide).

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

from scripts.engines.ensemble import predict_bag
from scripts.formats.checkpoints import load_into_network, resolve_checkpoints
from scripts.networks.bag_classifier import BagClassifier
from scripts.workflows.inference import SlideInference
from scripts.workflows.predict import SlidePredictor

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
    models = [load_into_network(c, BagClassifier("smile"))[0] for c in resolve_checkpoints(tmp_path / "train" / "cv")]
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
        load_into_network(tmp_path / "wrong.pt", BagClassifier("smile"))


def test_missing_features_without_stages_fails_per_slide(tmp_path):
    from scripts.data.datalist import SlideRecord

    _fold_checkpoints(tmp_path / "cv", n=1)
    predictor = SlidePredictor(BagClassifier("smile"), None, tmp_path / "cv", tmp_path)
    workflow = SlideInference([SlideRecord("s1", None, None, "p", "c")], predictor)
    result = workflow.run_slide(SlideRecord("s1", None, None, "p", "c"))
    assert result.status == "failed" and "no features for slide s1" in result.error


@pytest.mark.slow
def test_raw_slides_end_to_end(shared_slides, tmp_path, bundle_root):
    """Raw slides (one synthetic demo TIFF and the real CMU region) through tissue, grid, random-weight
    CTransPath and a 2-fold SMILE ensemble; every output written and the GeoJSON inside each slide."""
    pytest.importorskip("scripts.workflows.preprocess")
    pytest.importorskip("scripts.workflows.extract")
    from scripts.demo.cohort import make_demo_cohort

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
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
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

    # the public per-slide API on the same raw slide, in a fresh folder: same grid, probability and attention
    from scripts.workflows.predict import get_predictor, predict_slide

    api_out = tmp_path / "api"
    options = dict(allow_random_weights=True, num_workers=1, mask_backend="scipy")
    pred = predict_slide(shared_slides / "cmu-1-small-region.svs", tmp_path / "cv", api_out, slide_id="cmu", **options)
    with h5py.File(out / "attention" / "cmu.h5", "r") as handle:
        np.testing.assert_array_equal(pred.coords, handle["coords"][()])
        np.testing.assert_allclose(pred.attention, handle["attention"][()], rtol=1e-5, atol=1e-7)
    assert pred.probability == pytest.approx(float(results["cmu"]["probability"]), abs=1e-6)
    assert pred.threshold == pytest.approx(0.5) and pred.decision == int(pred.probability >= 0.5)
    assert pred.random_encoder and pred.mpp == pytest.approx(0.499, abs=1e-3) and pred.n_models == 2
    assert {"attention", "heatmap", "topk", "geojson", "patches", "features"} <= set(pred.outputs)
    assert all(path.is_file() and api_out in path.parents for path in pred.outputs.values())
    predictor = get_predictor(tmp_path / "cv", api_out, **options)
    models, encoder = list(predictor.models), predictor.feature_stage.encoder
    again = predict_slide(pred.outputs["features"], tmp_path / "cv", api_out, slide_id="cmu", **options)
    assert again.probability == pred.probability  # a feature file: the same bag, the same answer
    assert get_predictor(tmp_path / "cv", api_out, **options) is predictor  # loaded once, reused
    assert all(a is b for a, b in zip(predictor.models, models)) and predictor.feature_stage.encoder is encoder


def test_subset_datalist(tmp_path, shared_slides):
    from scripts.data.datalist import load_datalist, subset_datalist

    src = tmp_path / "d.csv"
    src.write_text("slide_id,path,label,patient_id,center\n" + "".join(
        f"s{i},{shared_slides / 'cmu-1-small-region.svs'},{i % 2},p{i},c\n" for i in range(5)))
    subset_datalist(str(src), str(tmp_path / "sub.csv"), n_slides=2,
                    add=[str(shared_slides / "cmu-1-small-region.svs"), str(tmp_path / "missing.svs")])
    records = load_datalist(tmp_path / "sub.csv", require_labels=False)
    assert [r.slide_id for r in records] == ["s0", "s1", "cmu-1-small-region"]


# blocks inference.json writes out that preprocess.json / extract.json also declare: {inference id: (file, id)}
SHARED_BLOCKS = {
    **{k: ("preprocess.json", k) for k in (
        "default_mpp", "patch_size", "target_mpp", "overlap", "stride", "min_tissue_fraction", "mask_backend",
        "mask_mpp", "tissue", "reader", "open_transform", "tissue_transform", "grid_transform", "slide_transforms",
        "settings", "overwrite")},
    **{k: ("extract.json", k) for k in (
        "encoder_name", "encoder_weights", "allow_random_weights", "seed", "batch_size", "num_workers",
        "num_threads", "precision", "decode_device", "reader_backend", "backends", "read_transform",
        "encoder_transform", "extract_transforms", "encoder")},
    "patch_reader": ("extract.json", "reader"),
    "patch_open_transform": ("extract.json", "open_transform"),
}
# extract.json's ids that inference.json renames (it holds preprocess.json's reader and open_transform too)
RENAMED = {"@reader": "@patch_reader", "@open_transform": "@patch_open_transform"}
# ids that mean something of their own in each file (paths, the device, the file's own workflow)
OWN_IDS = {"imports", "bundle_root", "datalist", "output_dir", "device", "run", "workflow"}


def _renamed(value):
    if isinstance(value, dict):
        return {k: _renamed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v) for v in value]
    return RENAMED.get(value, value)


def test_inference_json_blocks_equal_preprocess_and_extract(bundle_root):
    """inference.json is complete on its own; every block it shares with preprocess.json / extract.json is
    written out equal to that file's (extract.json's ``reader`` and ``open_transform`` under the names
    ``patch_reader`` / ``patch_open_transform``; the encoder is built lazily, ``_mode_: callable``)."""
    from scripts.workflows.extract import reader_backends

    configs = bundle_root / "configs"
    inference = json.loads((configs / "inference.json").read_text())
    sources = {name: json.loads((configs / name).read_text()) for name in ("preprocess.json", "extract.json")}
    for key, (name, source_key) in SHARED_BLOCKS.items():
        ours = inference[key]
        if isinstance(ours, dict):
            ours = {k: v for k, v in ours.items() if k != "_mode_"}
        theirs = _renamed(sources[name][source_key]) if name == "extract.json" else sources[name][source_key]
        assert ours == theirs, f"inference.json {key!r} differs from {name} {source_key!r}: {ours} != {theirs}"
    assert inference["encoder"]["_mode_"] == "callable"
    # preprocess.json lists its backends; inference (both readers) takes extract.json's reader_backend option,
    # whose "auto" is that same list
    assert list(reader_backends("auto")) == sources["preprocess.json"]["backends"]
    for name, source in sources.items():  # no id of those files sits in inference.json unchecked
        unchecked = set(source) & set(inference) - set(SHARED_BLOCKS) - OWN_IDS
        assert not unchecked, f"{name} ids in inference.json not kept equal by this test: {sorted(unchecked)}"


def _inference_parser(bundle_root, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "allow_random_weights": True,
                   "encoder_weights": "/nonexistent.pth", **overrides})
    return parser


def test_documented_inference_overrides_reach_their_components(bundle_root):
    """Each override the README documents for inference changes the component that uses it, on
    inference.json alone (the merged config-file list used to drop --reader_backend)."""
    parser = _inference_parser(bundle_root, patch_size=128, reader_backend="tifffile", num_workers=3,
                               precision="bf16", default_mpp=0.25,
                               **{"tissue#min_saturation": 40})
    predictor = parser.get_parsed_content("predictor")
    settings = predictor.patch_stage.settings
    assert settings.patch_size == 128 and predictor.patch_size == 128
    open_step, tissue_step, grid_step = settings.transforms.transforms
    assert grid_step.patch_size == 128  # --patch_size: the patch grid
    assert tissue_step.params.min_saturation == 40  # --tissue#min_saturation: the tissue mask
    assert open_step.reader.backends == ("tifffile",) and open_step.reader.default_mpp == 0.25  # slide reader
    stage = predictor.feature_stage
    patch_open, read_step = stage.options["slide_transforms"].transforms
    assert patch_open.reader.backends == ("tifffile",)  # --reader_backend: the patch reader too
    assert read_step.num_workers == 3  # --num_workers: reading threads
    if not torch.cuda.is_available():  # --decode_device: GPU decoding asked for on a host without CUDA
        from scripts.utils.errors import find_bundle_error

        with pytest.raises(Exception) as raised:
            _inference_parser(bundle_root, decode_device="cuda").get_parsed_content("predictor")
        assert "--decode_device cpu" in str(find_bundle_error(raised.value))
    assert stage.options["precision"] == "bf16"  # --precision
    assert stage.encoder_factory.keywords["weights"] == "/nonexistent.pth"  # --encoder_weights
    defaults = _inference_parser(bundle_root).get_parsed_content("predictor")
    assert defaults.patch_stage.settings.transforms.transforms[2].patch_size == 256
    assert defaults.patch_stage.settings.transforms.transforms[1].params.min_saturation == 15
    assert defaults.feature_stage.options["slide_transforms"].transforms[0].reader.backends == \
        tuple(json.loads((bundle_root / "configs" / "preprocess.json").read_text())["backends"])
    assert defaults.feature_stage.options["slide_transforms"].transforms[1].num_workers == 2


def test_inference_json_alone_runs_a_raw_slide_at_another_patch_size(shared_slides, tmp_path, bundle_root):
    """``--patch_size 512`` on inference.json alone: the grid, the features and the GeoJSON tiles follow."""
    _fold_checkpoints(tmp_path / "cv", n=1)
    datalist = tmp_path / "d.csv"
    datalist.write_text(f"slide_id,path\ncmu,{shared_slides / 'cmu-1-small-region.svs'}\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--datalist", str(datalist), "--output_dir", str(out), "--checkpoints", str(tmp_path / "cv"),
           "--allow_random_weights", "true", "--num_workers", "1", "--patch_size", "512", "--mask_backend", "scipy"]
    proc = subprocess.run(cmd, cwd=bundle_root, env=dict(os.environ, PYTHONPATH=str(bundle_root)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(csv.DictReader(open(out / "predictions.csv")))
    assert row["status"] == "ok", row
    with h5py.File(out / "patches" / "cmu.h5", "r") as handle:
        coords = handle["coords"][()]
        assert int(handle.attrs["patch_size"]) == 512
    assert len(coords) == int(row["n_patches"]) and 0 < len(coords) <= (2220 // 513) * (2967 // 513)
    ring = np.asarray(json.loads((out / "geojson" / "cmu.geojson").read_text())["features"][0]["geometry"]["coordinates"][0])
    assert ring[:, 0].max() - ring[:, 0].min() == pytest.approx(512 * 0.5 / 0.499, abs=2)
