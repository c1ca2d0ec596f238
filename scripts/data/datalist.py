"""The datalist: one CSV row per slide, the format users give for their own cohorts.

Columns
-------
``slide_id``    unique name of the slide (used for every output file name)
``path``        slide file, absolute or relative to the CSV's folder
``label``       0 (STAS absent) or 1 (STAS present); may be empty or absent for inference
``patient_id``  patient the slide comes from (cross-validation never splits a patient); for inference
                optional, defaulting to the slide id
``center``      hospital / scanner the slide comes from; optional for inference
``mpp``         optional: microns per pixel at level 0, overriding the slide's own metadata
``features``    optional: a precomputed feature file (.h5 with ``features``, or .pt), e.g. from CLAM
                or TRIDENT, relative to the CSV's folder; then ``path`` may be empty (docs/formats.md)

Training and evaluation need every column but ``mpp`` / ``features``. Inference (``require_labels=False``)
needs only ``slide_id`` and ``path`` or ``features``: a datalist of new slides is just their ids and files.
``annotations`` optional: the slide's region annotations as a QuPath GeoJSON export (level-0 pixels,
                ``objectType`` "annotation"), relative to the CSV's folder; evaluation and inference
                then report how well the attention localises them (``scripts.metrics.localisation``)

Every problem in a datalist is found before any heavy work starts and reported in one error.
With ``check_duplicates`` (every cohort that is split or scored: :func:`scripts.data.bags.bags_from_datalist`),
two rows whose slide files or feature files have the same content (:mod:`scripts.formats.fingerprint`;
the same path twice, or a copy under another name) are one of those problems: the same slide on two rows
could land in the training and the test part of a fold.

:func:`subset_datalist` writes a smaller datalist (the demo's inference set):
``python -m scripts.data.datalist subset_datalist --datalist <csv> --out <csv> --n_slides 3``.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from scripts.formats.fingerprint import describe_duplicates, duplicate_contents
from scripts.utils.errors import BundleError
from scripts.utils.io_utils import write_csv

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("slide_id", "path", "label", "patient_id", "center")
OPTIONAL_COLUMNS = ("mpp", "features", "annotations")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._+-]+$")


class DatalistError(BundleError, ValueError):
    """A datalist that cannot be used; the message lists every problem found and how to fix it."""


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    path: Path | None
    label: int | None
    patient_id: str
    center: str
    mpp: float | None = None
    features: Path | None = None
    extra: dict = field(default_factory=dict, compare=False)
    annotations: Path | None = None

    def as_row(self) -> dict:
        return {
            "slide_id": self.slide_id,
            "path": "" if self.path is None else str(self.path),
            "label": "" if self.label is None else self.label,
            "patient_id": self.patient_id,
            "center": self.center,
            "mpp": "" if self.mpp is None else self.mpp,
            "features": "" if self.features is None else str(self.features),
            "annotations": "" if self.annotations is None else str(self.annotations),
        }


def load_datalist(
    csv_path: str | Path,
    require_labels: bool = True,
    check_files: bool = True,
    require_slides: bool = True,
    check_duplicates: bool = False,
) -> list[SlideRecord]:
    """Read and validate a datalist CSV.

    Args:
        csv_path: the CSV file.
        require_labels: training and evaluation need a 0/1 label on every row; inference does not.
        check_files: check that every referenced file exists.
        require_slides: every row needs a slide ``path`` (False when rows may name ``features`` only).
        check_duplicates: two rows whose slide files (or feature files) have the same content are a
            problem naming both rows (files that exist are compared; see :mod:`scripts.formats.fingerprint`).
            Off for preprocessing and extraction, which may list one slide twice on purpose.

    Raises:
        DatalistError: naming the file, each bad row and the fix, all problems at once.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatalistError(f"datalist {csv_path} does not exist; pass --datalist <path to a CSV>.")
    root = csv_path.resolve().parent
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]

    if require_labels:
        required = list(REQUIRED_COLUMNS)
    else:  # inference: new slides need only an id and a file (patient_id defaults to the slide id)
        required = ["slide_id"] + ([] if "features" in columns else ["path"])
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatalistError(
            f"datalist {csv_path}: missing column(s) {', '.join(missing)}. Expected a header with "
            f"{','.join(REQUIRED_COLUMNS)} (optional: {','.join(OPTIONAL_COLUMNS)}); found {','.join(columns) or 'none'}."
        )
    if not rows:
        raise DatalistError(f"datalist {csv_path} has a header but no rows; add one row per slide.")

    problems: list[str] = []
    records: list[SlideRecord] = []
    seen_ids: dict[str, int] = {}
    centers_of_patient: dict[str, set[str]] = defaultdict(set)
    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"line {line_no}"
        slide_id = row.get("slide_id", "")
        if not slide_id:
            problems.append(f"{where}: empty slide_id")
        elif not _SAFE_ID.match(slide_id):
            problems.append(f"{where}: slide_id {slide_id!r} may only use letters, digits and . _ + - (it names output files)")
        elif slide_id in seen_ids:
            problems.append(f"{where}: duplicate slide_id {slide_id!r} (first on line {seen_ids[slide_id]})")
        else:
            seen_ids[slide_id] = line_no

        label = None
        raw_label = row.get("label", "")
        if raw_label:
            try:
                label_value = float(raw_label)
            except ValueError:
                label_value = math.nan
            if label_value not in (0.0, 1.0):
                problems.append(f"{where}: label {raw_label!r} of slide {slide_id!r} is not 0 or 1")
            else:
                label = int(label_value)
        elif require_labels:
            problems.append(f"{where}: slide {slide_id!r} has no label (training and evaluation need 0 or 1)")

        patient_id = row.get("patient_id", "")
        center = row.get("center", "")
        if not patient_id and not require_labels:
            patient_id = slide_id  # inference: each slide its own patient unless told otherwise
        if not patient_id:
            problems.append(f"{where}: slide {slide_id!r} has no patient_id (needed for leakage-free splits)")
        if "center" in columns and not center and require_labels:
            problems.append(f"{where}: slide {slide_id!r} has no center")
        if patient_id and center:
            centers_of_patient[patient_id].add(center)

        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = math.nan
            if not (0.05 <= mpp <= 20.0):
                problems.append(f"{where}: mpp {row['mpp']!r} of slide {slide_id!r} is not a plausible microns-per-pixel value (0.05-20)")
                mpp = None

        slide_path = _resolve(root, row.get("path", ""))
        features_path = _resolve(root, row.get("features", ""))
        annotations_path = _resolve(root, row.get("annotations", ""))
        if slide_path is None and (require_slides or features_path is None):
            problems.append(f"{where}: slide {slide_id!r} has an empty path")
        if check_files:
            if slide_path is not None and not slide_path.exists() and (require_slides or features_path is None):
                problems.append(f"{where}: slide file {slide_path} of {slide_id!r} does not exist")
            if features_path is not None and not features_path.exists():
                problems.append(f"{where}: feature file {features_path} of {slide_id!r} does not exist")
            if annotations_path is not None and not annotations_path.is_file():
                problems.append(f"{where}: annotation file {annotations_path} of {slide_id!r} does not exist "
                                "(a QuPath GeoJSON export; leave the cell empty when the slide has none)")

        extra = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
        records.append(SlideRecord(slide_id, slide_path, label, patient_id, center, mpp, features_path, extra,
                                   annotations=annotations_path))

    if check_duplicates:
        problems.extend(duplicate_row_problems(records, [line for line, _ in enumerate(rows, start=2)]))

    for patient_id, centers in sorted(centers_of_patient.items()):
        if len(centers) > 1:
            problems.append(f"patient {patient_id!r} appears in several centres ({', '.join(sorted(centers))}); one patient belongs to one centre")

    if problems:
        listed = "\n  - ".join(problems)
        raise DatalistError(f"datalist {csv_path} has {len(problems)} problem(s):\n  - {listed}")
    return records


def duplicate_row_problems(records: list[SlideRecord], lines: list[int]) -> list[str]:
    """One problem per group of rows whose slide files, or feature files, have the same content."""
    problems = []
    for what, attribute in (("slide file", "path"), ("feature file", "features")):
        entries = [(f"line {line} (slide {r.slide_id!r})", getattr(r, attribute)) for r, line in zip(records, lines)]
        problems.extend(describe_duplicates(group, what) for group in duplicate_contents(entries))
    return problems


def annotation_paths(csv_path: str | Path) -> dict[str, Path]:
    """slide_id -> annotation file of the datalist's rows that have one (empty when none does)."""
    records = load_datalist(csv_path, require_labels=False, check_files=False, require_slides=False)
    return {r.slide_id: r.annotations for r in records if r.annotations is not None}


def _resolve(root: Path, value: str) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root / path)


def subset_datalist(datalist: str, out: str, n_slides: int = 3, add: Sequence[str] | str = (), n_positive: int = 0) -> None:
    """Write a datalist with the first ``n_slides`` rows of ``datalist`` (of which the first ``n_positive``
    labelled-positive rows come first) plus the slide files in ``add`` (those that exist; slide_id = file
    stem). Paths become absolute. Used by ``make demo``::

        python -m scripts.data.datalist subset_datalist --datalist data/demo/cohort/datalist.csv \\
            --out data/demo/out/inference_datalist.csv --n_slides 3 --add ../shared/data/slides/cmu-1-small-region.svs
    """
    records = load_datalist(datalist, require_labels=False)
    positives = [r for r in records if r.label == 1][: int(n_positive)]
    records = (positives + [r for r in records if r not in positives])[: int(n_slides)]
    rows = [dict(r.as_row(), path=str(Path(r.path).resolve()) if r.path else "") for r in records]
    for path in [add] if isinstance(add, str) else list(add):
        path = Path(path)
        if path.is_file():
            rows.append({"slide_id": path.stem, "path": str(path.resolve()), "label": "", "patient_id": path.stem,
                         "center": "external", "mpp": "", "features": ""})
        else:
            logger.warning("%s not found; left out of %s", path, out)
    for row in rows:
        if row.get("annotations"):
            row["annotations"] = str(Path(row["annotations"]).resolve())
    write_csv(out, rows, ["slide_id", "path", "label", "patient_id", "center", "mpp", "features", "annotations"])
    print(f"{out}: {len(rows)} slide(s)")


if __name__ == "__main__":
    import fire

    fire.Fire({"subset_datalist": subset_datalist})
