"""Datalist validation: every problem is reported at once, with the file and the fix."""

from __future__ import annotations

import pytest

from scripts.data.datalist import DatalistError, load_datalist


def _write(tmp_path, text, touch=("a.tiff", "b.tiff", "c.tiff")):
    for name in touch:
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "list.csv"
    path.write_text(text)
    return path


def test_valid_datalist_resolves_paths_relative_to_csv(tmp_path):
    path = _write(tmp_path, "slide_id,path,label,patient_id,center,mpp\nA,a.tiff,1,p1,c1,0.25\nB,b.tiff,0,p2,c1,\n")
    records = load_datalist(path)
    assert [r.slide_id for r in records] == ["A", "B"]
    assert records[0].path == tmp_path / "a.tiff"
    assert records[0].mpp == 0.25 and records[1].mpp is None
    assert records[0].label == 1 and records[1].label == 0


def test_missing_columns_named(tmp_path):
    path = _write(tmp_path, "slide_id,path,label\nA,a.tiff,1\n")
    with pytest.raises(DatalistError, match="missing column.*patient_id, center") as err:
        load_datalist(path)
    assert str(path) in str(err.value)


def test_all_row_problems_reported_together(tmp_path):
    text = (
        "slide_id,path,label,patient_id,center,mpp\n"
        "A,a.tiff,1,p1,c1,\n"
        "A,b.tiff,0,p2,c1,\n"          # duplicate id
        "C,missing.tiff,2,p3,c2,\n"    # missing file, bad label
        "D,c.tiff,1,p1,c2,352.9\n"     # patient in two centres, nonsense mpp
    )
    with pytest.raises(DatalistError) as err:
        load_datalist(_write(tmp_path, text))
    message = str(err.value)
    assert "duplicate slide_id 'A'" in message
    assert "missing.tiff" in message and "does not exist" in message
    assert "label '2'" in message
    assert "patient 'p1' appears in several centres" in message
    assert "352.9" in message
    assert "5 problem(s)" in message


def test_labels_optional_for_inference(tmp_path):
    path = _write(tmp_path, "slide_id,path,patient_id,center\nA,a.tiff,p1,c1\n")
    with pytest.raises(DatalistError, match="missing column.*label"):
        load_datalist(path)
    records = load_datalist(path, require_labels=False)
    assert records[0].label is None


def test_feature_only_rows(tmp_path):
    (tmp_path / "f.h5").write_bytes(b"x")
    path = _write(tmp_path, "slide_id,path,label,patient_id,center,features\nA,,1,p1,c1,f.h5\n")
    with pytest.raises(DatalistError, match="empty path"):
        load_datalist(path)
    records = load_datalist(path, require_slides=False)
    assert records[0].features == tmp_path / "f.h5" and records[0].path is None


def test_unsafe_slide_id_rejected(tmp_path):
    path = _write(tmp_path, "slide_id,path,label,patient_id,center\n../x,a.tiff,1,p1,c1\n")
    with pytest.raises(DatalistError, match="may only use"):
        load_datalist(path)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(DatalistError, match="does not exist; pass --datalist"):
        load_datalist(tmp_path / "nope.csv")


def test_optional_annotations_column(tmp_path):
    (tmp_path / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    path = _write(tmp_path, "slide_id,path,label,patient_id,center,annotations\nA,a.tiff,1,p1,c1,a.geojson\nB,b.tiff,0,p2,c1,\n")
    records = load_datalist(path)
    assert records[0].annotations == tmp_path / "a.geojson" and records[1].annotations is None
    assert records[0].as_row()["annotations"] == str(tmp_path / "a.geojson")
    path = _write(tmp_path, "slide_id,path,label,patient_id,center,annotations\nA,a.tiff,1,p1,c1,gone.geojson\n")
    with pytest.raises(DatalistError, match="annotation file .*gone.geojson.* does not exist"):
        load_datalist(path)
