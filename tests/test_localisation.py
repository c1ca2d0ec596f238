"""Localisation metrics against region annotations: exact overlaps, forced attention, QuPath GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.formats.annotations import (
    AnnotationError,
    polygon_annotation,
    read_annotations,
    write_annotations,
)
from scripts.metrics.localisation import (
    SlideAttention,
    localise_cohort,
    patch_overlap,
    patient_bootstrap_mean_ci,
    slide_localisation,
)

# A QuPath 0.4/0.5 "Export objects as GeoJSON" file, written by hand in its documented format: a tumour
# annotation with a hole, a two-part MultiPolygon annotation, a detection (cell) and a point annotation.
QUPATH_GEOJSON = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "3f3c6d52-1b39-4a0e-9b8f-0f1d2a1c0e11",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]],
          [[150, 150], [150, 250], [250, 250], [250, 150], [150, 150]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "name": "lesion 1",
        "classification": {"name": "STAS", "color": [200, 0, 0]},
        "isLocked": false
      }
    },
    {
      "type": "Feature",
      "id": "a1c2f3e4-0000-4b5b-8c8c-222222222222",
      "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
          [[[1000, 1000], [1100, 1000], [1100, 1100], [1000, 1100], [1000, 1000]]],
          [[[2000, 0], [2050, 0], [2050, 50], [2000, 50], [2000, 0]]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "measurements": {"Area": 12500.0}
      }
    },
    {
      "type": "Feature",
      "id": "d1d1d1d1-0000-4b5b-8c8c-333333333333",
      "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]},
      "properties": {"objectType": "detection", "classification": {"name": "Tumor", "color": [200, 0, 0]}}
    },
    {
      "type": "Feature",
      "id": "e1e1e1e1-0000-4b5b-8c8c-444444444444",
      "geometry": {"type": "Point", "coordinates": [500, 500]},
      "properties": {"objectType": "annotation"}
    }
  ]
}
"""


def test_qupath_geojson_is_read(tmp_path):
    path = tmp_path / "slide.geojson"
    path.write_text(QUPATH_GEOJSON)
    annotations = read_annotations(path)
    assert [a.classification for a in annotations] == ["STAS", "Tumor"]  # detection and point left out
    assert annotations[0].name == "lesion 1" and annotations[0].color == (200, 0, 0)
    assert annotations[0].area == pytest.approx(200 * 200 - 100 * 100)  # the hole is not annotated
    assert annotations[1].geometry.geom_type == "MultiPolygon"
    assert annotations[1].area == pytest.approx(100 * 100 + 50 * 50)
    assert [a.classification for a in read_annotations(path, classes=["STAS"])] == ["STAS"]
    assert len(read_annotations(path, object_types=("annotation", "detection"))) == 3

    # written back, it reads the same (QuPath import format: FeatureCollection of annotation Features)
    again = tmp_path / "again.geojson"
    write_annotations(again, annotations, slide_id="S1")
    data = json.loads(again.read_text())
    assert data["type"] == "FeatureCollection"
    assert {f["properties"]["objectType"] for f in data["features"]} == {"annotation"}
    reread = read_annotations(again)
    assert [round(a.area) for a in reread] == [30000, 12500]
    assert reread[0].geometry.equals(annotations[0].geometry)


def test_bad_annotation_files_name_the_file(tmp_path):
    with pytest.raises(AnnotationError, match="does not exist"):
        read_annotations(tmp_path / "missing.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.geojson"):
        read_annotations(bad)
    bad.write_text('{"type": "Polygon", "coordinates": []}')
    with pytest.raises(AnnotationError, match="FeatureCollection"):
        read_annotations(bad)
    # a bare list of features (QuPath's export without "FeatureCollection") is accepted
    listed = tmp_path / "list.geojson"
    listed.write_text(json.dumps(json.loads(QUPATH_GEOJSON)["features"]))
    assert len(read_annotations(listed)) == 2


def test_overlap_on_hand_made_polygons():
    side = 100
    # a 200x200 square with a 100x100 hole in its middle, patch grid of 100 px from (0, 0) to (300, 300)
    ring = [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]
    hole = [[150, 150], [250, 150], [250, 250], [150, 250], [150, 150]]
    holed = polygon_annotation([ring, hole])
    coords = np.array([[x, y] for y in range(0, 400, side) for x in range(0, 400, side)])
    overlap = patch_overlap(coords, side, [holed]).reshape(4, 4)
    expected = np.zeros((4, 4))
    expected[1:3, 1:3] = 0.75  # each of the four inner patches loses a 50x50 quarter to the hole
    np.testing.assert_allclose(overlap, expected, atol=1e-12)

    # a triangle: half of the patch it spans; a patch only touching its edge has zero area overlap
    triangle = polygon_annotation([[[0, 0], [100, 0], [0, 100], [0, 0]]])
    np.testing.assert_allclose(patch_overlap([[0, 0], [100, 0], [50, 50]], 100, [triangle]), [0.5, 0.0, 0.0])

    # a multipolygon of two parts, plus an annotation overlapping one part: the union counts once
    multi = polygon_annotation([
        [[[0, 0], [50, 0], [50, 50], [0, 50], [0, 0]]],
        [[[100, 100], [200, 100], [200, 200], [100, 200], [100, 100]]],
    ])
    overlapping = polygon_annotation([[[0, 0], [50, 0], [50, 100], [0, 100], [0, 0]]])
    got = patch_overlap([[0, 0], [100, 100], [100, 0]], 100, [multi, overlapping])
    np.testing.assert_allclose(got, [0.5, 1.0, 0.0])
    # a shifted patch grid (corners not on polygon vertices): analytic areas
    got = patch_overlap([[25, 25], [150, 150]], 100, [multi])
    np.testing.assert_allclose(got, [(25 * 25 + 25 * 25) / 1e4, 50 * 50 / 1e4])


def _synthetic_slide():
    rng = np.random.default_rng(0)
    coords = np.array([[x, y] for y in range(0, 2048, 256) for x in range(0, 2048, 256)])  # 64 patches
    lesion = polygon_annotation([[[300, 300], [800, 300], [800, 600], [300, 600], [300, 300]]], "STAS")
    overlap = patch_overlap(coords, 256, [lesion])
    on = overlap > 0
    assert on.sum() == 6  # the lesion spans 3 x 2 patches
    return rng, coords, lesion, overlap, on


def test_forced_attention_gives_perfect_and_zero_scores():
    rng, coords, lesion, overlap, on = _synthetic_slide()
    forced_on = np.where(on, 1.0, 0.0) + rng.uniform(0, 1e-3, len(on))
    forced_on /= forced_on.sum()
    result = slide_localisation(forced_on, overlap, top_k=8)
    assert result["attention_auc"] == 1.0 and result["top_k_hit"] == 1.0
    assert result["attention_mass"] > 0.99
    forced_off = np.where(on, 0.0, 1.0) + rng.uniform(0, 1e-3, len(on))
    forced_off /= forced_off.sum()
    result = slide_localisation(forced_off, overlap, top_k=8)
    assert result["attention_auc"] == 0.0 and result["top_k_hit"] == 0.0
    assert result["attention_mass"] < 0.01
    # uniform attention: the AUC is undecided (0.5) and the mass is the annotated share of patches
    flat = slide_localisation(np.full(len(on), 1 / len(on)), overlap, top_k=8)
    assert flat["attention_auc"] == 0.5 and flat["attention_mass"] == pytest.approx(6 / 64)


def test_localise_cohort_writes_slide_and_summary_outputs(tmp_path):
    rng, coords, lesion, overlap, on = _synthetic_slide()
    annotations = tmp_path / "lesion.geojson"
    write_annotations(annotations, [lesion], slide_id="P1-S1")
    broken = tmp_path / "broken.geojson"
    broken.write_text("[")
    on_att = np.where(on, 1.0, 0.01)
    off_att = np.where(on, 0.01, 1.0)
    slides = [
        SlideAttention("P1-S1", "P1", 1, coords, 256, on_att, annotations),
        SlideAttention("P1-S2", "P1", 1, coords, 256, on_att, annotations),
        SlideAttention("P2-S1", "P2", 1, coords, 256, off_att, annotations),
        SlideAttention("P3-S1", "P3", 0, coords, 256, off_att, annotations),  # negative: not in the means
        SlideAttention("P4-S1", "P4", 1, coords, 256, on_att, None),  # not annotated
        SlideAttention("P5-S1", "P5", 1, coords, 256, on_att, broken),  # one bad file: reported, others go on
    ]
    summary = localise_cohort(slides, tmp_path / "out", top_k=8, n_bootstrap=500)
    assert summary["n_slides"] == 3 and summary["n_patients"] == 2
    assert summary["attention_auc"] == pytest.approx(2 / 3)
    assert summary["top_k_hit_rate"] == pytest.approx(2 / 3)
    low, high = summary["attention_auc_ci"]
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0 and high > low
    assert len(summary["failed_slides"]) == 1 and "P5-S1" in summary["failed_slides"][0]
    saved = json.loads((tmp_path / "out" / "localisation_summary.json").read_text())
    for key in ("attention_auc", "top_k_hit_rate", "attention_mass_on_annotations", "n_slides"):
        assert key in saved
    patch_rows = (tmp_path / "out" / "localisation" / "P1-S1.csv").read_text().splitlines()
    assert patch_rows[0].startswith("x,y,overlap,touches_annotation,attention")
    assert len(patch_rows) == 1 + 64
    assert sum(int(r.split(",")[3]) for r in patch_rows[1:]) == 6


def test_patient_bootstrap_keeps_a_patients_slides_together():
    # patient A: two slides at 1, patient B: one slide at 0 -> resampled means are 0, 1 or 2/3, 1/3...
    low, high = patient_bootstrap_mean_ci([1.0, 1.0, 0.0], ["A", "A", "B"], n_bootstrap=2000)
    assert low == 0.0 and high == 1.0
    assert patient_bootstrap_mean_ci([0.7, 0.7], ["A", "B"]) == [pytest.approx(0.7), pytest.approx(0.7)]


def _feature_cohort(root, n_slides=24, dim=8, seed=0):
    """Feature files with level-0 patch coordinates on a 6x6 grid of 512-px patches, an annotation file
    per slide; positive slides carry a shifted feature in the 2 patches their annotation covers."""
    import h5py

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction *= 10.0 / np.linalg.norm(direction)
    (root / "features").mkdir(parents=True)
    (root / "annotations").mkdir()
    coords = np.array([[x, y] for y in range(0, 3072, 512) for x in range(0, 3072, 512)])
    rows = ["slide_id,path,label,patient_id,center,annotations"]
    for i in range(n_slides):
        label = i % 2
        x = rng.normal(size=(len(coords), dim)).astype(np.float32)
        lesions = []
        if label:
            cell = int(rng.integers(0, len(coords) - 1))
            if cell % 6 == 5:
                cell -= 1
            x[[cell, cell + 1]] += direction  # two neighbouring patches, covered by one annotation
            cx, cy = coords[cell]
            lesions = [polygon_annotation([[[cx + 100, cy + 100], [cx + 900, cy + 100], [cx + 900, cy + 400],
                                            [cx + 100, cy + 400], [cx + 100, cy + 100]]], "STAS")]
        with h5py.File(root / "features" / f"s{i:02d}.h5", "w") as handle:
            handle["features"] = x
            handle["coords"] = coords
            handle.attrs["patch_size_level0"] = 512
        write_annotations(root / "annotations" / f"s{i:02d}.geojson", lesions)
        rows.append(f"s{i:02d},slides/s{i:02d}.tif,{label},p{i % 2 if i < 4 else i},c{'AB'[i % 2]},annotations/s{i:02d}.geojson")
    (root / "datalist.csv").write_text("\n".join(rows) + "\n")
    return root / "datalist.csv"


def test_compare_and_evaluate_write_localisation(tmp_path):
    """Out-of-fold attention per method in the comparison, fold-ensemble attention in evaluation."""
    from scripts.data.datalist import annotation_paths
    from scripts.data.splits import make_splits
    from scripts.experiments.compare import compare_methods, load_bags
    from scripts.workflows.evaluate import evaluate_cohort
    from scripts.workflows.training import training_parser

    datalist = _feature_cohort(tmp_path)
    bags = load_bags(datalist, tmp_path / "features")
    annotations = annotation_paths(datalist)
    assert len(annotations) == 24
    splits = make_splits(bags, n_folds=3, seed=0)
    parser = training_parser({"epochs": 30, "batch_size": 4, "optimizer_name": "adam", "lr": 2e-3,
                              "device": "$torch.device('cpu')", "num_threads": 1, "patience": 0})
    comparison = compare_methods(bags, splits, tmp_path / "out", methods=["smile", "mean_pool"],
                                 method_kwargs={"smile": {"embed_dim": 16, "attention_dim": 8}},
                                 n_bootstrap=100, paired_bootstrap=100, annotations=annotations, top_k=2, parser=parser)
    rows = {r["method"]: r for r in comparison["rows"]}
    assert rows["smile"]["localisation_slides"] == 12
    assert rows["smile"]["pooled_auc"] > 0.9  # learnt, and the attention finds the annotated patches:
    assert rows["smile"]["attention_auc"] > 0.9 and rows["smile"]["top_k_hit_rate"] > 0.8
    assert rows["mean_pool"]["attention_auc"] is None  # no attention: no localisation figures
    summary = json.loads((tmp_path / "out" / "compare" / "smile" / "localisation_summary.json").read_text())
    assert summary["n_slides"] == 12 and summary["top_k"] == 2
    markdown = (tmp_path / "out" / "compare" / "comparison.md").read_text()
    assert "top-2 hit rate" in markdown and "n/a (no attention)" in markdown

    # evaluation's localisation files (the cohort is the training one: refused unless allowed, then stamped)
    result = evaluate_cohort(bags, tmp_path / "out" / "compare" / "smile" / "cv", tmp_path / "eval",
                             n_bootstrap=100, annotations=annotations, top_k=2, allow_overlap=True)
    assert result["overlap"]["in_sample"] is True
    assert result["localisation"]["n_slides"] == 12
    assert (tmp_path / "eval" / "evaluation" / "localisation_summary.json").is_file()
    assert len(list((tmp_path / "eval" / "evaluation" / "localisation").glob("*.csv"))) == 24
