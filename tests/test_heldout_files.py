"""Held out means held out: fold checkpoints fingerprint their training slides' files, evaluation refuses
a training slide under any slide or patient id (re-keyed, or copied under another name), a datalist
listing one file's content twice is refused naming both rows, and a genuinely different slide passes.

Slides: a small synthetic demo cohort (real H&E texture, pyramidal TIFFs) for training and the real
shared slides as genuinely different ones; features are small bundle-layout h5 files written here."""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import shutil
import time

import h5py
import numpy as np
import pytest
import torch

from scripts.data.bags import bags_from_datalist
from scripts.data.datalist import DatalistError, load_datalist
from scripts.data.heldout import OverlapError
from scripts.data.splits import make_splits
from scripts.formats.fingerprint import BLOCK_BYTES, FINGERPRINT_METHOD, HEAD_BYTES, file_fingerprint
from scripts.networks import build_mil_network
from scripts.workflows.evaluate import evaluate_cohort, evaluation_bags
from scripts.workflows.training import TrainSettings, run_cross_validation

DIM = 8
FAST = dict(epochs=1, lr=1e-3, batch_size=4, patience=0, num_threads=1)
COLUMNS = ["slide_id", "path", "label", "patient_id", "center", "features"]


def _features(path, label, seed):
    rng = np.random.default_rng(seed)
    n = 6 + seed % 5
    x = rng.normal(size=(n, DIM)).astype(np.float32) + label
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["features"] = x
        h5["coords"] = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
        h5.attrs["patch_size_level0"] = 256
    return path


def _datalist(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_slides):
    """10 demo slides of 10 patients with feature files, 2 fold models trained on them (mean pooling, 1 epoch)."""
    from scripts.demo.cohort import make_demo_cohort

    root = tmp_path_factory.mktemp("heldout")
    demo = make_demo_cohort(root / "cohort", n_slides=10, n_patients=10, size_um=256, seed=3, workers=1,
                            texture_source=shared_slides / "cmu-1-small-region.svs", show_progress=False)
    rows = []
    for i, record in enumerate(load_datalist(demo)):
        features = _features(root / "features" / f"{record.slide_id}.h5", record.label, seed=i)
        rows.append({"slide_id": record.slide_id, "path": str(record.path), "label": record.label,
                     "patient_id": record.patient_id, "center": record.center, "features": str(features)})
    bags = bags_from_datalist(_datalist(root / "train.csv", rows))
    splits = make_splits(bags, n_folds=2, seed=0, val_fraction=0.34)
    run_cross_validation(functools.partial(build_mil_network, "mean_pool"), bags, splits, TrainSettings(**FAST),
                         output_dir=root / "run", n_bootstrap=10)
    return root, rows, splits


def _other(root, shared_slides, name, slide_file, label, seed):
    """A cohort row of a genuinely different (shared, real) slide with its own new feature file."""
    features = _features(root / "other" / f"{name}.h5", label, seed=100 + seed)
    return {"slide_id": name, "path": str(shared_slides / slide_file), "label": label, "patient_id": f"Q-{name}",
            "center": "elsewhere", "features": str(features)}


def _evaluate(root, rows, name, **kwargs):
    bags = evaluation_bags(_datalist(root / f"{name}.csv", rows), require_labels=False)
    return evaluate_cohort(bags, root / "run" / "cv", root / f"eval_{name}", n_bootstrap=10, **kwargs)


def _fold_of(splits, slide_id):
    return [f"fold{f['fold']}" for f in splits["folds"] if slide_id in f["train"] + f.get("val", [])]


def test_fold_checkpoints_record_slide_and_feature_fingerprints(trained):
    root, rows, splits = trained
    checkpoint = torch.load(root / "run" / "cv" / "fold0" / "model.pt", weights_only=True)
    meta, fold = checkpoint["metadata"], splits["folds"][0]
    assert meta["fingerprint_method"] == FINGERPRINT_METHOD
    recorded = {s["slide_id"]: s for s in meta["training_slides"]}
    assert set(recorded) == set(fold["train"]) | set(fold["val"])
    assert {s["part"] for s in recorded.values()} == {"train", "val"}
    by_id = {r["slide_id"]: r for r in rows}
    for slide_id, s in recorded.items():
        assert s["patient_id"] == by_id[slide_id]["patient_id"]
        assert s["slide_fingerprint"] == file_fingerprint(by_id[slide_id]["path"]) is not None
        assert s["features_fingerprint"] == file_fingerprint(by_id[slide_id]["features"]) is not None
    assert len({s["slide_fingerprint"] for s in recorded.values()}) == len(recorded)  # different slides differ


def test_rekeyed_training_slide_is_refused(trained, shared_slides):
    root, rows, splits = trained
    seen = rows[0]  # a training slide listed again: new slide id, new patient, same slide and feature file
    rekeyed = dict(seen, slide_id="NEW-01", patient_id="NEWPATIENT", center="elsewhere")
    cohort = [_other(root, shared_slides, "cmu", "cmu-1-small-region.svs", 0, 0), rekeyed]
    with pytest.raises(OverlapError) as raised:
        _evaluate(root, cohort, "rekeyed")
    message = str(raised.value)
    assert "1 of the cohort's 2 slides" in message and "--allow_overlap true" in message
    assert "of the cohort's 2 patients" not in message  # the patient ids are all new: the files give it away
    line = next(li for li in message.splitlines() if "'NEW-01'" in li)
    assert "slide file content and feature file content" in line and repr(seen["slide_id"]) in line
    for fold in _fold_of(splits, seen["slide_id"]):
        assert fold in line
    assert "'cmu'" not in message
    summary = _evaluate(root, cohort, "rekeyed", allow_overlap=True)
    overlap = summary["overlap"]
    assert overlap["in_sample"] and overlap["n_patients"] == 0 and overlap["n_matched_slides"] == 1
    assert overlap["matched_slides"][0]["slide_id"] == "NEW-01"


@pytest.mark.parametrize("copied", ["slide and features", "slide", "features"])
def test_training_file_copied_under_another_name_is_refused(trained, shared_slides, copied):
    root, rows, splits = trained
    seen = rows[3]
    folder = root / f"copies_{copied.replace(' ', '_')}"
    folder.mkdir()
    row = {"slide_id": "COPY-01", "path": "", "label": seen["label"], "patient_id": "COPYPATIENT",
           "center": "elsewhere"}
    if "slide" in copied:
        row["path"] = str(shutil.copy(seen["path"], folder / "renamed.tiff"))
    row["features"] = (str(shutil.copy(seen["features"], folder / "renamed.h5")) if "features" in copied
                       else str(_features(folder / "fresh.h5", seen["label"], seed=77)))  # re-extracted: other bytes
    cohort = [_other(root, shared_slides, "kidney", "kidney-48-5.tif", 1, 1), row]
    with pytest.raises(OverlapError) as raised:
        _evaluate(root, cohort, f"copy_{copied.replace(' ', '_')}")
    line = next(li for li in str(raised.value).splitlines() if "'COPY-01'" in li)
    expected = {"slide and features": "slide file content and feature file content",
                "slide": "same slide file content as", "features": "same feature file content as"}[copied]
    assert expected in line and repr(seen["slide_id"]) in line and _fold_of(splits, seen["slide_id"])[0] in line


def test_genuinely_different_slides_pass(trained, shared_slides, caplog):
    root, _, _ = trained
    cohort = [_other(root, shared_slides, "cmu", "cmu-1-small-region.svs", 0, 2),
              _other(root, shared_slides, "kidney", "kidney-48-5.tif", 1, 3),
              _other(root, shared_slides, "tcga", "tcga-cr-7395-01a-01-ts1.svs", 1, 4)]
    with caplog.at_level(logging.WARNING, logger="scripts.data.heldout"):
        summary = _evaluate(root, cohort, "genuine")
    overlap = summary["overlap"]
    assert not overlap["in_sample"] and overlap["n_matched_slides"] == 0 and overlap["n_patients"] == 0
    assert overlap["unfingerprinted_models"] == [] and "fingerprint" not in caplog.text
    assert summary["n_labelled"] == 3 and (root / "eval_genuine" / "evaluation" / "summary.json").is_file()


def test_checkpoint_without_fingerprints_loads_with_a_warning(trained, shared_slides, tmp_path, caplog):
    root, rows, _ = trained
    old_cv = tmp_path / "cv"
    for fold_dir in sorted((root / "run" / "cv").glob("fold*")):
        checkpoint = torch.load(fold_dir / "model.pt", weights_only=True)
        for key in ("training_slides", "fingerprint_method"):
            del checkpoint["metadata"][key]  # as written before fingerprints were recorded
        (old_cv / fold_dir.name).mkdir(parents=True)
        torch.save(checkpoint, old_cv / fold_dir.name / "model.pt")
    cohort = [_other(root, shared_slides, "cmu", "cmu-1-small-region.svs", 0, 5),
              _other(root, shared_slides, "kidney", "kidney-48-5.tif", 1, 6)]
    bags = evaluation_bags(_datalist(tmp_path / "old.csv", cohort), require_labels=False)
    with caplog.at_level(logging.WARNING, logger="scripts.data.heldout"):
        summary = evaluate_cohort(bags, old_cv, tmp_path / "eval", n_bootstrap=10)
    assert "record their training slide ids but not the slides' file fingerprints" in caplog.text
    assert sorted(summary["overlap"]["unfingerprinted_models"]) == ["fold0", "fold1"]
    assert not summary["overlap"]["in_sample"]
    # the slide ids they record are still checked
    bags = evaluation_bags(_datalist(tmp_path / "old_ids.csv", [dict(rows[0], patient_id="NEWPATIENT")]),
                           require_labels=False)
    with pytest.raises(OverlapError, match=rf"slide {rows[0]['slide_id']!r} \(patient 'NEWPATIENT'\): same slide id as"):
        evaluate_cohort(bags, old_cv, tmp_path / "eval_ids", n_bootstrap=10)


def test_datalist_rows_with_the_same_file_content_are_refused_naming_both(trained, shared_slides, tmp_path):
    _, rows, _ = trained
    a, b, c = rows[0], rows[1], rows[2]
    copy = shutil.copy(b["path"], tmp_path / "b_copy.tiff")
    listed = [a, dict(a, slide_id="A-AGAIN", patient_id="PA2", features=""),   # same path twice (line 3)
              b, dict(c, slide_id="B-COPY", path=str(copy), features=""), c]   # a copy of b's slide (line 5)
    datalist = _datalist(tmp_path / "dups.csv", listed)
    with pytest.raises(DatalistError) as raised:
        bags_from_datalist(datalist, features_dir=tmp_path / "nothing")
    message = str(raised.value)
    assert "2 problem(s)" in message
    assert f"line 2 (slide {a['slide_id']!r}) and line 3 (slide 'A-AGAIN') point at the same slide file {a['path']}" in message
    assert f"line 4 (slide {b['slide_id']!r}) and line 5 (slide 'B-COPY') point at slide files with the same content" in message
    assert "keep one row per slide" in message
    load_datalist(datalist)  # preprocessing / extraction may list one slide twice on purpose

    # feature files found under features_dir by slide id: a copy under a second slide's name is caught too
    features = tmp_path / "features"
    features.mkdir()
    shutil.copy(a["features"], features / "X1.h5")
    shutil.copy(a["features"], features / "X2.h5")
    shutil.copy(b["features"], features / "X3.h5")
    datalist = _datalist(tmp_path / "feature_dups.csv", [
        {"slide_id": f"X{i}", "path": str(shared_slides / name), "label": i % 2, "patient_id": f"PX{i}", "center": "c",
         "features": ""} for i, name in ((1, "cmu-1-small-region.svs"), (2, "kidney-48-5.tif"), (3, "boxes.tiff"))])  # fmt: skip
    with pytest.raises(DatalistError, match=r"line 2 \(slide 'X1'\) and line 3 \(slide 'X2'\) point at feature files "
                                            r"with the same content"):
        bags_from_datalist(datalist, features_dir=features)
    (features / "X2.h5").unlink()
    _features(features / "X2.h5", 1, seed=50)
    assert [bag.bag_id for bag in bags_from_datalist(datalist, features_dir=features)] == ["X1", "X2", "X3"]


def test_fingerprint_reads_a_bounded_sample_of_a_large_file(tmp_path, shared_slides):
    small = shared_slides / "boxes.tiff"  # small files are hashed whole
    data = small.read_bytes()
    assert file_fingerprint(small) == hashlib.sha256(len(data).to_bytes(8, "little") + data).hexdigest()
    big = tmp_path / "big.svs"
    with open(big, "wb") as handle:  # a 3 GiB sparse file: a fingerprint must not read it all
        handle.truncate(3 * 1024**3)
    start = time.perf_counter()
    first = file_fingerprint(big)
    assert time.perf_counter() - start < 2.0

    def poke(offset):
        with open(big, "r+b") as handle:
            handle.seek(offset)
            handle.write(b"\x01")
        os.utime(big, ns=(time.time_ns(), time.time_ns() + 1))

    poke(10)  # inside the first MiB: another fingerprint
    second = file_fingerprint(big)
    assert second != first
    poke(HEAD_BYTES + BLOCK_BYTES + 12345)  # between the first and second middle block: the documented blind spot
    assert file_fingerprint(big) == second
    assert file_fingerprint(tmp_path / "absent.svs") is None and file_fingerprint(tmp_path) is None
