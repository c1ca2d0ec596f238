"""A run whose every slide fails ends in one short paragraph and a non-zero exit (the summary is still written)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys


def test_unreadable_slide_given_alone_exits_non_zero(bundle_root, shared_slides, tmp_path):
    datalist = tmp_path / "datalist.csv"
    datalist.write_text(f"slide_id,path,label,patient_id,center\nbroken,{shared_slides / 'broken.svs'},,p1,c1\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/preprocess.json",
           "--meta_file", "configs/metadata.json", "--datalist", str(datalist), "--output_dir", str(out),
           "--num_workers", "0", "--mask_backend", "scipy"]
    proc = subprocess.run(cmd, cwd=bundle_root, env=dict(os.environ, PYTHONPATH=str(bundle_root)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "every slide failed (1 of 1)" in errors[0] and "broken.svs" in errors[0]
    assert "preprocess_summary.csv" in errors[0]
    rows = list(csv.DictReader(open(out / "preprocess_summary.csv")))
    assert [r["status"] for r in rows] == ["failed"]
