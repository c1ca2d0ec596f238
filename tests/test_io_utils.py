"""Atomic writes: a failure leaves the old file (or none) and no temporary debris."""

from __future__ import annotations

import json
import stat

import pytest

from scripts.utils.io_utils import atomic_path, write_csv, write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_temporary_name_keeps_suffix_and_final_mode_is_readable(tmp_path):
    target = tmp_path / "x.h5"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".h5" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"data")
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH


def test_write_csv_union_of_columns(tmp_path):
    target = tmp_path / "rows.csv"
    write_csv(target, [{"a": 1}, {"a": 2, "b": "x"}])
    assert target.read_text().splitlines() == ["a,b", "1,", "2,x"]
