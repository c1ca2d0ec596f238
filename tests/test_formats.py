"""CLAM and TRIDENT files both ways (scripts/formats/patch_file.py, scripts/formats/feature_file.py).

The foreign files are written here from the two projects' documented formats (see docs/formats.md):
CLAM ``patches/<id>.h5`` (attributes on ``coords``: patch_size at patch_level, patch_level, downsample,
level_dim, downsampled_level_dim, name, save_path), ``h5_files/<id>.h5`` (features float32, coords int32,
no attributes) and ``pt_files/<id>.pt`` (the tensor alone); TRIDENT
``<job>/<mag>x_<size>px_<overlap>px_overlap/patches/<id>_patches.h5`` and ``features_<encoder>/<id>.h5``
(coords attributes patch_size, patch_size_level0, level0_magnification, target_magnification, overlap,
name, savetodir, level0_width, level0_height; features.attrs['encoder']). The bundle's own files are read
back with functions that touch only the attributes CLAM's and TRIDENT's loaders touch.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from scripts.formats.feature_file import (
    FeatureExpectation,
    FeatureMismatchError,
    check_features,
    feature_info,
    find_feature_file,
    patch_geometry,
    read_features,
)
from scripts.formats.patch_file import read_patch_file

CMU = "cmu-1-small-region.svs"  # 2220 x 2967, one level, 0.499 µm/px
CMU_MPP = 0.499
DIM = 24
NET = dict(in_dim=DIM, embed_dim=16, attention_dim=8)  # the small SMILE trained here


# --------------------------------------------------------------------------- the peers' layouts, written
def clam_patches(folder: Path, slide_id: str, coords, patch_size=256, level=0, downsample=1.0, level_dim=(2220, 2967)):
    """CLAM create_patches_fp.py: <folder>/patches/<id>.h5, every attribute on 'coords'."""
    path = folder / "patches" / f"{slide_id}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("coords", data=np.asarray(coords, np.int64))
        ds.attrs.update(patch_size=patch_size, patch_level=level, downsample=np.array([downsample, downsample]),
                        downsampled_level_dim=np.array(level_dim), level_dim=np.array(level_dim), name=slide_id,
                        save_path=str(path.parent))
    return path


def clam_features(folder: Path, slide_id: str, coords, features):
    """CLAM extract_features_fp.py: h5_files/<id>.h5 (features float32, coords int32, no attrs) and
    pt_files/<id>.pt (the features tensor only)."""
    (folder / "h5_files").mkdir(parents=True, exist_ok=True)
    (folder / "pt_files").mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "h5_files" / f"{slide_id}.h5", "w") as h5:
        h5.create_dataset("features", data=np.asarray(features, np.float32))
        h5.create_dataset("coords", data=np.asarray(coords, np.int32))
    torch.save(torch.from_numpy(np.asarray(features, np.float32)), folder / "pt_files" / f"{slide_id}.pt")
    return folder / "h5_files" / f"{slide_id}.h5", folder / "pt_files" / f"{slide_id}.pt"


def trident_files(job: Path, slide_id: str, coords, features, mag=20, size=256, mpp=CMU_MPP, encoder="ctranspath",
                  dims=(2220, 2967)):
    """TRIDENT: <job>/<mag>x_<size>px_0px_overlap/patches/<id>_patches.h5 and features_<encoder>/<id>.h5."""
    folder = job / f"{mag}x_{size}px_0px_overlap"
    level0_mag = 10.0 / mpp
    attrs = dict(patch_size=size, patch_size_level0=int(round(size * level0_mag / mag)),
                 level0_magnification=level0_mag, target_magnification=mag, overlap=0, name=slide_id,
                 savetodir=str(folder), level0_width=dims[0], level0_height=dims[1])
    (folder / "patches").mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "patches" / f"{slide_id}_patches.h5", "w") as h5:
        h5.create_dataset("coords", data=np.asarray(coords, np.int64)).attrs.update(attrs)
    (folder / f"features_{encoder}").mkdir(parents=True, exist_ok=True)
    path = folder / f"features_{encoder}" / f"{slide_id}.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=np.asarray(features, np.float32)).attrs["encoder"] = encoder
        h5.create_dataset("coords", data=np.asarray(coords, np.int64)).attrs.update(attrs)
    return folder, path


def grid(step, width=2220, height=2967, size=None):
    size = size or step
    xs, ys = np.meshgrid(np.arange(0, width - size + 1, step), np.arange(0, height - size + 1, step))
    return np.stack([xs.ravel(), ys.ravel()], 1)


# ------------------------------------------------------------------ the peers' loaders, as accesses only
def clam_read_patch(h5_path, slide, index=0):
    """What CLAM's Whole_Slide_Bag_FP does: patch_level and patch_size from coords.attrs, read there."""
    with h5py.File(h5_path, "r") as f:
        level, size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
        coord = f["coords"][index]
    return slide.read_region(tuple(int(c) for c in coord), int(level), (int(size), int(size))), int(level), int(size)


def trident_level0_read(h5_path):
    """What TRIDENT's feature extraction reads: patch_size, level0/target magnification (errors if absent),
    giving the level-0 side it reads; its slide encoders read patch_size_level0."""
    with h5py.File(h5_path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    patch_size, src, dst = attrs["patch_size"], attrs["level0_magnification"], attrs["target_magnification"]
    return coords, patch_size, patch_size * src / dst, attrs["patch_size_level0"]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cmu(shared_slides):
    return shared_slides / CMU


# ------------------------------------------------------------------------------- bundle files -> peers
def bundle(bundle_root, config, *args):
    """``python -m monai.bundle run`` as docs/formats.md shows it; fails the test on a non-zero exit."""
    import os
    import subprocess
    import sys

    config_file = f"configs/{config}.json"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file,
           "--meta_file", "configs/metadata.json", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(bundle_root), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_bundle_patch_and_feature_files_read_by_clam_and_trident(cmu, tmp_path, bundle_root):
    import openslide

    out = tmp_path / "out"
    datalist = tmp_path / "new.csv"
    datalist.write_text(f"slide_id,path\ncmu,{cmu}\n")  # an inference-style datalist is enough
    # docs/formats.md, "bundle -> CLAM / TRIDENT"
    bundle(bundle_root, "preprocess", "--datalist", datalist, "--output_dir", out, "--backends", "['openslide']")
    bundle(bundle_root, "extract", "--datalist", datalist, "--output_dir", out, "--write_pt_files", "true",
           "--encoder_name", "timm:test_resnet", "--encoder_weights", "", "--allow_random_weights", "true",
           "--reader_backend", "openslide", "--num_workers", "1")
    patch_file = out / "patches" / "cmu.h5"
    ours = read_patch_file(patch_file)

    slide = openslide.OpenSlide(str(cmu))
    region, level, size = clam_read_patch(patch_file, slide)
    assert level == 0 and abs(size - ours.read_size_level) <= 1  # CLAM reads the bundle's footprint (±1 px)
    with h5py.File(patch_file, "r") as f:
        attrs = f["coords"].attrs
        assert tuple(attrs["level_dim"]) == slide.level_dimensions[0] == tuple(attrs["downsampled_level_dim"])
        assert tuple(attrs["downsample"]) == (1.0, 1.0) and attrs["name"] == "cmu"
    coords, t_size, side0, size0 = trident_level0_read(patch_file)
    assert t_size == 256 and side0 == pytest.approx(256 * 0.5 / CMU_MPP, abs=0.01) and size0 == ours.patch_size_level0
    with h5py.File(patch_file, "r") as f:
        assert f["coords"].attrs["level0_magnification"] == pytest.approx(10 / CMU_MPP)
        assert f["coords"].attrs["target_magnification"] == pytest.approx(20.0) and f["coords"].attrs["overlap"] == 0
    np.testing.assert_array_equal(coords, ours.coords)

    h5_path, pt_path = out / "features" / "cmu.h5", out / "pt_files" / "cmu.pt"
    with h5py.File(h5_path, "r") as f:  # CLAM use_h5: features + coords; TRIDENT slide encoders: coords attrs
        features, coords = f["features"][:], f["coords"][:]
        attrs = dict(f["coords"].attrs)
        assert f["features"].attrs["encoder"] == "timm:test_resnet"
    torch.testing.assert_close(torch.load(pt_path, weights_only=True), torch.from_numpy(features))  # CLAM pt_files
    np.testing.assert_array_equal(coords, ours.coords)
    assert attrs["patch_size_level0"] == ours.patch_size_level0 and attrs["patch_level"] == 0
    assert attrs["encoder"] == "timm:test_resnet" and attrs["weights_sha256"] == "random"
    assert attrs["precision"] == "fp32" and attrs["mpp"] == pytest.approx(CMU_MPP)
    assert attrs["target_magnification"] == pytest.approx(20.0) and attrs["feature_dim"] == features.shape[1]
    info = feature_info(h5_path)
    assert (info.layout, info.encoder, info.n) == ("bundle", "timm:test_resnet", len(coords))


# -------------------------------------------------------------------------------- peers -> the bundle
def _cohort(root: Path, layout: str, n=20, mag=20, encoder="ctranspath", start=0):
    """n synthetic bags (dim 24; positives carry shifted instances) in a CLAM or TRIDENT layout."""
    rng = np.random.default_rng(start)
    rows = []
    coords = grid(256)[:30]
    for i in range(start, start + n):
        x = rng.normal(size=(len(coords), DIM)).astype(np.float32)
        label = i % 2
        if label:
            x[:4] += 2.0
        sid = f"s{i:02d}"
        if layout == "trident":
            _, path = trident_files(root / "trident", sid, coords, x, mag=mag, encoder=encoder)
        else:
            clam_patches(root / "clam", sid, coords)
            path = clam_features(root / "clam", sid, coords, x)[0 if layout == "clam_h5" else 1]
        rows.append({"slide_id": sid, "path": "", "label": label, "patient_id": f"p{i}", "center": "c0",
                     "mpp": CMU_MPP, "features": str(path)})
    return rows


def _write_datalist(path: Path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _train(datalist, out):
    from scripts.data.bags import bags_from_datalist
    from scripts.data.splits import make_splits
    from scripts.networks import build_mil_network
    from scripts.workflows.training import TrainSettings, run_cross_validation

    bags = bags_from_datalist(datalist)
    splits = make_splits(bags, n_folds=3, seed=0)
    run_cross_validation(functools.partial(build_mil_network, "smile", embed_dim=16, attention_dim=8), bags, splits,
                         TrainSettings(epochs=2, lr=1e-3, batch_size=4, patience=0, num_threads=1),
                         output_dir=out, n_bootstrap=20)
    return bags


@pytest.mark.parametrize("layout", ["clam_h5", "clam_pt", "trident"])
def test_training_on_clam_and_trident_files_records_what_it_was_trained_on(tmp_path, layout):
    datalist = _write_datalist(tmp_path / "d.csv", _cohort(tmp_path, layout))
    bags = _train(datalist, tmp_path / "train")
    record = torch.load(tmp_path / "train" / "cv" / "fold0" / "model.pt", weights_only=False)["features"]
    assert record["feature_dim"] == DIM and record["patch_size"] == 256
    # TRIDENT: 257 level-0 px at 10/20.04 µm/px over 256 px; CLAM: 256 px at the datalist's 0.499
    assert record["target_mpp"] == pytest.approx(0.501 if layout == "trident" else CMU_MPP, abs=1e-3)
    assert record["encoder"] == ("ctranspath" if layout == "trident" else None)  # CLAM files name no encoder
    assert bags.feature_record == record


def test_training_refuses_mixed_encoders_and_scales(tmp_path):
    from scripts.data.bags import bags_from_datalist
    from scripts.formats.feature_file import FeatureMismatchError

    rows = _cohort(tmp_path, "trident", n=6) + _cohort(tmp_path, "trident", n=6, encoder="uni_v1", start=6)
    with pytest.raises(FeatureMismatchError, match="mixes encoders.*ctranspath.*uni_v1"):
        bags_from_datalist(_write_datalist(tmp_path / "enc.csv", rows))
    rows = _cohort(tmp_path, "trident", n=6) + _cohort(tmp_path, "trident", n=6, mag=10, start=6)
    with pytest.raises(FeatureMismatchError, match=r"mixes patch scales.*128 µm patches \(0.501 µm/px\).*256 µm patches \(1 µm/px\)"):
        bags_from_datalist(_write_datalist(tmp_path / "mag.csv", rows))


@pytest.fixture(scope="module")
def trident_models(tmp_path_factory):
    """Fold checkpoints trained on TRIDENT 20x ctranspath-named features (dim 24)."""
    root = tmp_path_factory.mktemp("train")
    datalist = _write_datalist(root / "d.csv", _cohort(root, "trident"))
    _train(datalist, root / "train")
    return root / "train" / "cv"


def test_inference_on_clam_and_trident_files(cmu, tmp_path, trident_models):
    """Each foreign layout at the datalist (or found in feature_dirs) -> probability, attention, heat map,
    top-k and GeoJSON; 10x files and another encoder are refused naming what is wrong."""
    from scripts.networks.bag_classifier import BagClassifier
    from scripts.workflows.inference import SlideInference
    from scripts.workflows.predict import SlidePredictor

    rng = np.random.default_rng(5)
    c20 = grid(256)  # 20x: 256 level-0 px at 0.499 µm/px
    c10 = grid(512)  # 10x: 512 level-0 px
    f20, f10 = rng.normal(size=(len(c20), DIM)), rng.normal(size=(len(c10), DIM))
    job = tmp_path / "trident"
    t20_dir, _ = trident_files(job, "t20", c20, f20)  # found through feature_dirs, not the datalist
    _, t10 = trident_files(job, "t10", c10, f10, mag=10)
    _, conch = trident_files(job, "conch", c20, f20, encoder="conch_v15")
    clam_patches(tmp_path / "clam", "c20", c20)
    c20_h5, c20_pt = clam_features(tmp_path / "clam", "c20", c20, f20)
    clam_patches(tmp_path / "clam", "c10", c10, patch_size=512)  # CLAM at level 0 with 512-px patches: 10x content
    c10_h5, _ = clam_features(tmp_path / "clam", "c10", c10, f10)
    alone, _ = clam_features(tmp_path / "alone", "bare", c20, f20)  # no patch file anywhere: slide mpp + config
    rows = [("t20", ""), ("c20", c20_h5), ("c20pt", c20_pt), ("bare", alone), ("t10", t10), ("c10", c10_h5),
            ("conch", conch)]
    datalist = tmp_path / "d.csv"
    datalist.write_text("slide_id,path,features\n" + "".join(f"{s},{cmu},{f}\n" for s, f in rows))

    def run(out, **kw):
        from scripts.workflows.inference import SlideDataset

        predictor = SlidePredictor(BagClassifier("smile", **NET), None, trident_models, out, top_k=4,
                                   thumbnail_size=256, feature_dirs=[t20_dir], patch_size=256, target_mpp=0.5, **kw)
        workflow = SlideInference(SlideDataset(datalist), predictor)
        return {r["slide_id"]: r for r in workflow.run()}

    out = tmp_path / "out"
    result = run(out)
    for sid in ("t20", "c20", "c20pt", "bare"):
        assert result[sid]["status"] == "ok", result[sid]
        assert 0 < float(result[sid]["probability"]) < 1
        for name in (f"attention/{sid}.h5", f"heatmaps/{sid}.png", f"heatmaps/{sid}_topk.png", f"geojson/{sid}.geojson"):
            assert (out / name).is_file(), name
        geo = json.loads((out / "geojson" / f"{sid}.geojson").read_text())
        assert len(geo["features"]) == len(c20)
        ring = np.asarray(geo["features"][0]["geometry"]["coordinates"][0])
        assert ring[:, 0].max() - ring[:, 0].min() == pytest.approx(256, abs=1.5)  # the level-0 footprint
    sources = {}
    for sid in ("t20", "c20", "c20pt", "bare"):
        with h5py.File(out / "attention" / f"{sid}.h5", "r") as f:
            sources[sid] = str(f.attrs["patch_size_level0_source"])
    assert sources["t20"].startswith("feature file") and sources["c20"].startswith("patch file")
    assert sources["c20pt"].startswith("patch file") and sources["bare"].startswith("slide mpp")
    # the same features however they are stored: same probability
    assert result["c20"]["probability"] == result["c20pt"]["probability"] == result["t20"]["probability"]
    for sid in ("t10", "c10"):
        assert result[sid]["status"] == "failed"
        assert re.search(r"i\.e\. (0\.998|1) µm/px \(10x\)", result[sid]["error"]), result[sid]["error"]
        assert "trained on 0.501 µm/px (20x" in result[sid]["error"]
        assert "--feature_checks false" in result[sid]["error"] and sid in result[sid]["error"]
    assert result["conch"]["status"] == "failed" and "'conch_v15'" in result["conch"]["error"]
    assert "'ctranspath'" in result["conch"]["error"]
    forced = run(tmp_path / "forced", feature_checks=False)
    assert forced["t10"]["status"] == "ok" and forced["conch"]["status"] == "ok"


def test_import_checks(tmp_path):
    coords = grid(256)[:10]
    _, path = trident_files(tmp_path, "a", coords, np.zeros((10, DIM)))
    info = feature_info(path)
    assert (info.layout, info.encoder, info.dim) == ("trident", "ctranspath", DIM)
    geometry = patch_geometry(path, "a")
    assert geometry.patch_size_level0 == 257 and geometry.patch_mpp() == pytest.approx(0.501, abs=1e-3)
    assert check_features(info, FeatureExpectation("CTransPath", DIM, 0.5, 256), geometry) == []
    with pytest.raises(FeatureMismatchError, match=f"dimension {DIM}.*trained on 768"):
        check_features(info, FeatureExpectation("ctranspath", 768, 0.5), geometry)
    with h5py.File(path, "a") as f:  # a truncated file: rows and coords disagree
        del f["coords"]
        f.create_dataset("coords", data=coords[:7])
    with pytest.raises(FeatureMismatchError, match="10 feature rows but 7 coordinates"):
        read_features(path)
    # search order: the datalist column wins; then output_dir/features; then feature_dirs
    _, other = trident_files(tmp_path / "job2", "b", coords, np.zeros((10, DIM)))
    assert find_feature_file("b", other, tmp_path / "out", [tmp_path]) == other
    assert find_feature_file("b", None, tmp_path / "out", [other.parent.parent]) == other
    assert find_feature_file("b", None, tmp_path / "out", [tmp_path]) is None


def test_inference_cli_finds_a_trident_job(cmu, tmp_path, trident_models, bundle_root):
    """docs/formats.md, "CLAM / TRIDENT -> bundle": a datalist of ids and slides, features found in a
    TRIDENT job folder by --feature_dirs."""
    c20 = grid(256)
    t20_dir, _ = trident_files(tmp_path / "job", "cmu", c20, np.random.default_rng(1).normal(size=(len(c20), DIM)))
    datalist = tmp_path / "new.csv"
    datalist.write_text(f"slide_id,path\ncmu,{cmu}\n")
    out = tmp_path / "out"
    bundle(bundle_root, "inference", "--datalist", datalist, "--output_dir", out, "--checkpoints", trident_models,
           "--feature_dirs", f"['{t20_dir}']", "--mil_network#in_dim", DIM, "--mil_network#embed_dim", 16,
           "--mil_network#attention_dim", 8)
    row = next(csv.DictReader(open(out / "predictions.csv")))
    assert row["status"] == "ok" and 0 < float(row["probability"]) < 1, row
    for name in ("attention/cmu.h5", "heatmaps/cmu.png", "heatmaps/cmu_topk.png", "geojson/cmu.geojson"):
        assert (out / name).is_file(), name
    assert not (out / "patches").exists()  # the slide was not tiled again


def test_false_on_the_command_line_turns_checks_off(tmp_path):
    from scripts.networks.bag_classifier import BagClassifier
    from scripts.workflows.predict import SlidePredictor

    make = functools.partial(SlidePredictor, BagClassifier("smile", **NET), None, [], tmp_path)
    assert make(feature_checks="false").feature_checks is False and make().feature_checks is True


def test_extraction_from_clam_and_trident_patch_files(cmu, tmp_path):
    """CLAM's patches/<id>.h5 and TRIDENT's <id>_patches.h5 copied into <out>/patches are extracted as they
    are; the feature files then carry the level-0 footprint, so a 10x grid is refused for a 20x model."""
    from scripts.networks.encoders import build_encoder
    from scripts.workflows.extract import FeatureExtractionWorkflow

    out = tmp_path / "out"
    clam_patches(out, "clam20", grid(256)[:6])  # CLAM writes <dir>/patches/<id>.h5
    trident_files(tmp_path / "job", "tri20", grid(256)[:6], np.zeros((6, DIM)))
    trident_files(tmp_path / "job", "tri10", grid(512)[:6], np.zeros((6, DIM)), mag=10)
    for mag, sid in ((20, "tri20"), (10, "tri10")):
        src = tmp_path / "job" / f"{mag}x_256px_0px_overlap" / "patches" / f"{sid}_patches.h5"
        (out / "patches" / src.name).write_bytes(src.read_bytes())
    datalist = tmp_path / "d.csv"
    datalist.write_text("slide_id,path\n" + "".join(f"{s},{cmu}\n" for s in ("clam20", "tri20", "tri10")))
    encoder = build_encoder("timm:test_resnet", weights="", allow_random_weights=True)
    rows = FeatureExtractionWorkflow(datalist, out, encoder, batch_size=8, num_workers=1, progress=False,
                                     reader_backend="openslide").run()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"], rows
    expected = FeatureExpectation(encoder.name, encoder.feature_dim, 0.5, 256)
    for sid, size0 in (("clam20", 256), ("tri20", 257), ("tri10", 513)):
        path = out / "features" / f"{sid}.h5"
        info = feature_info(path)
        geometry = patch_geometry(path, sid, out, slide_mpp=CMU_MPP)
        assert geometry.patch_size_level0 == size0 and geometry.source.startswith("feature file"), geometry
        if sid == "tri10":
            with pytest.raises(FeatureMismatchError, match=r"1 µm/px \(10x\).*0.5 µm/px \(20x"):
                check_features(info, expected, geometry)
        else:
            assert check_features(info, expected, geometry) == []
