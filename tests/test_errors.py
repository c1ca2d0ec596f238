"""User-facing errors: one short paragraph naming the file, non-zero exit, traceback only on request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scripts.data.datalist import DatalistError
from scripts.utils.errors import debug_requested, find_bundle_error


def test_bundle_error_found_under_monai_style_wrapping():
    inner = DatalistError("datalist x.csv: missing column(s) label")
    try:
        try:
            raise inner
        except Exception as exc:  # what MONAI does around a config expression
            raise RuntimeError("Failed to evaluate ConfigExpression ...") from exc
    except RuntimeError as outer:
        assert find_bundle_error(outer) is inner
    assert find_bundle_error(RuntimeError("plain")) is None
    assert isinstance(inner, ValueError)  # still catchable as before by per-slide loops


def test_debug_flag_parsing(monkeypatch):
    monkeypatch.delenv("SMILE_DEBUG", raising=False)
    assert not debug_requested(["run", "--datalist", "x"])
    assert debug_requested(["run", "--debug", "true"])
    assert debug_requested(["run", "--debug=True"])
    assert not debug_requested(["run", "--debug", "false"])
    monkeypatch.setenv("SMILE_DEBUG", "1")
    assert debug_requested(["run"])


def _run_bad_datalist(bundle_root, tmp_path, *extra):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path\nA,missing.svs\n")
    env = {k: v for k, v in os.environ.items() if k != "SMILE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/preprocess.json",
         "--datalist", str(bad), "--output_dir", str(tmp_path / "out"), *extra],
        cwd=bundle_root, capture_output=True, text=True, env=env, timeout=300,
    ), bad


@pytest.mark.parametrize("debug", [False, True])
def test_bad_datalist_is_one_short_error(bundle_root, tmp_path, debug):
    proc, bad = _run_bad_datalist(bundle_root, tmp_path, *(["--debug", "true"] if debug else []))
    assert proc.returncode != 0
    if debug:
        assert "Traceback" in proc.stderr
    else:
        assert "Traceback" not in proc.stderr, proc.stderr
        error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, proc.stderr
        assert str(bad) in proc.stderr or bad.name in proc.stderr
        assert len(proc.stderr.splitlines()) < 25, proc.stderr
