"""One home per output path: stages ask scripts.formats.layout.OutputLayout, never spell folders out."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.formats.layout import OutputLayout, layout_of

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("patches", "features", "previews", "attention", "heatmaps", "geojson", "cv", "compare", "ablation",
           "transfer", "evaluation")
FILES = ("preprocess_summary.csv", "extract_summary.csv", "splits.json", "inference_timings.csv")
# a path built with the "/" operator from a literal folder or file name of the output layout
SPELLED = re.compile(r'/\s*"(%s)"' % "|".join(re.escape(n) for n in FOLDERS + FILES))
# the demo driver lists the outputs it shows in its final table; it prints them, it does not write them
NOT_STAGES = {"scripts/formats/layout.py", "scripts/demo/run.py"}


def test_paths_of_one_slide():
    layout = OutputLayout("/tmp/out")
    assert layout.patch_file("S1") == Path("/tmp/out/patches/S1.h5")
    assert layout.feature_file("S1") == Path("/tmp/out/features/S1.h5")
    assert layout.preview("S1") == Path("/tmp/out/previews/S1.png")
    assert layout.heatmap("S1").parent == layout.topk("S1").parent == Path("/tmp/out/heatmaps")
    assert layout.fold_checkpoint(3) == Path("/tmp/out/cv/fold3/model.pt")
    assert layout_of(layout) is layout and layout_of("/tmp/out") == layout


def test_no_stage_spells_an_output_path():
    offenders = []
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in NOT_STAGES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # ``<feature file>.parent.parent / "patches"``: a foreign tool's sibling folder (CLAM, TRIDENT)
            if any(not line[: m.start()].rstrip().endswith("parent") for m in SPELLED.finditer(line)):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "use scripts.formats.layout.OutputLayout instead:\n" + "\n".join(offenders)
