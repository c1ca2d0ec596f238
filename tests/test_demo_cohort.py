"""The synthetic demo cohort: deterministic, pyramidal, correct resolution, sparse lesions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile

from scripts.data.datalist import load_datalist
from scripts.demo.cohort import LEVEL0_MPP, make_demo_cohort, plan_cohort


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory, shared_slides_or_none):
    out = tmp_path_factory.mktemp("cohort")
    datalist = make_demo_cohort(out, n_slides=5, n_patients=4, size_um=384, seed=3,
                                texture_source=shared_slides_or_none, show_progress=False)
    return out, datalist


@pytest.fixture(scope="module")
def shared_slides_or_none(request):
    from tests.conftest import SHARED_DIR

    path = SHARED_DIR / "data" / "slides" / "cmu-1-small-region.svs"
    return path if path.exists() else None


def test_datalist_is_valid_user_format(small_cohort):
    _, datalist = small_cohort
    records = load_datalist(datalist)
    assert len(records) == 5
    assert {r.center for r in records} <= {"centerA", "centerB", "centerC"}
    assert all(r.path.exists() and r.label in (0, 1) for r in records)
    # one patient has two slides, and they share the label
    by_patient = {}
    for r in records:
        by_patient.setdefault(r.patient_id, set()).add(r.label)
    assert len(by_patient) == 4 and all(len(v) == 1 for v in by_patient.values())


def test_slides_are_jpeg_tiled_pyramids_at_quarter_micron(small_cohort):
    _, datalist = small_cohort
    path = load_datalist(datalist)[0].path
    with tifffile.TiffFile(path) as tif:
        pages = tif.pages
        assert len(pages) == 4
        assert pages[0].shape == (1536, 1536, 3)
        assert [p.shape[0] for p in pages] == [1536, 768, 384, 192]
        assert all(p.is_tiled and p.compression == tifffile.COMPRESSION.JPEG for p in pages)
        x_res = pages[0].tags["XResolution"].value
        unit = pages[0].tags["ResolutionUnit"].value
        assert unit == tifffile.RESUNIT.CENTIMETER
        mpp = 1e4 / (x_res[0] / x_res[1])
        assert mpp == pytest.approx(LEVEL0_MPP)


def test_cuCIM_and_openslide_see_the_resolution(small_cohort):
    _, datalist = small_cohort
    path = str(load_datalist(datalist)[0].path)
    openslide = pytest.importorskip("openslide")
    slide = openslide.OpenSlide(path)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert slide.level_count == 4
    from scripts.utils.quiet import native_stderr_silenced

    with native_stderr_silenced():
        from cucim import CuImage

        image = CuImage(path)
    assert image.resolutions["level_count"] == 4
    assert image.spacing()[0] == pytest.approx(0.25)


def test_lesions_are_annotated_and_only_in_positives(small_cohort):
    out, datalist = small_cohort
    import csv

    from scripts.formats.annotations import read_annotations

    records = load_datalist(datalist)
    labels = {r.slide_id: r.label for r in records}
    with open(out / "cohort_info.csv") as handle:
        info = {r["slide_id"]: r for r in csv.DictReader(handle)}
    for record in records:
        annotations = read_annotations(record.annotations)  # QuPath GeoJSON, one per slide
        if labels[record.slide_id] == 1:
            assert 1 <= len(annotations) == int(info[record.slide_id]["n_lesions"])
            assert {a.classification for a in annotations} == {"STAS"}
            assert 0 < float(info[record.slide_id]["lesion_fraction"]) < 0.10  # of the tissue pixels (a tiny slide)
        else:
            assert annotations == [] and float(info[record.slide_id]["lesion_fraction"]) == 0


def test_planted_lesions_match_their_annotations_and_stay_sparse():
    """At the demo's slide size: every annotation (level-0 px) covers the tumour cells drawn (drawing px x 2),
    lesions sit inside single patches of the default grid, and touch at most 10% of the tissue patches."""
    from scripts.demo.cohort import DEFAULT_SIZE_UM, WORK_MPP, draw_slide, lesion_cells
    from scripts.formats.annotations import polygon_annotation
    from scripts.metrics.localisation import patch_overlap

    rng = np.random.default_rng(0)
    bank = [rng.integers(120, 200, (128, 128, 3)).astype(np.uint8) for _ in range(4)]  # plain texture: fast
    side = int(DEFAULT_SIZE_UM / WORK_MPP)
    plans = [p for p in plan_cohort(12, 10, seed=0) if p.label == 1][:2]
    for plan in plans:
        image, stats, lesions = draw_slide(plan, side, bank)
        assert stats["n_lesions"] == len(lesions) >= 1
        touched, tissue_patches = lesion_cells(lesions, side, 256, stats["tissue_mask_cells"])
        assert touched == len(lesions)  # one patch per lesion
        assert touched <= 0.10 * tissue_patches
        # tumour nuclei (dark purple) lie inside the annotations, not outside
        annotations = [polygon_annotation([(o * 2).tolist()]) for o in lesions]
        dark = np.argwhere((image[..., 0] < 110) & (image[..., 2] > image[..., 1] + 25))
        coords0 = dark[:, ::-1] * 2  # (x, y) level-0 of each dark drawing pixel
        inside = patch_overlap(coords0, 2, annotations) > 0
        assert inside.mean() > 0.6  # (texture nuclei elsewhere are not this dark purple)


def test_tissue_looks_stained_and_background_is_bright(small_cohort):
    _, datalist = small_cohort
    with tifffile.TiffFile(load_datalist(datalist)[0].path) as tif:
        low = tif.pages[2].asarray()
    corner = low[:8, :8].reshape(-1, 3).mean(0)
    pixels = low.reshape(-1, 3).astype(float)
    assert corner.min() > 200  # glass
    saturation = (pixels.max(1) - pixels.min(1)) / np.maximum(pixels.max(1), 1)
    assert (saturation > 0.15).mean() > 0.25  # stained tissue over a good part of the slide


def test_cohort_is_deterministic(tmp_path, shared_slides_or_none):
    first = make_demo_cohort(tmp_path / "a", n_slides=2, n_patients=2, size_um=256, seed=7,
                             texture_source=shared_slides_or_none, show_progress=False)
    second = make_demo_cohort(tmp_path / "b", n_slides=2, n_patients=2, size_um=256, seed=7,
                              texture_source=shared_slides_or_none, show_progress=False)
    for name in ("P001-S1.tiff", "P002-S1.tiff"):
        digest = [hashlib.sha256((p.parent / "slides" / name).read_bytes()).hexdigest() for p in (first, second)]
        assert digest[0] == digest[1]
    assert first.read_text() == second.read_text()


def test_plan_balances_centres_and_labels():
    plans = plan_cohort(40, 30, seed=0)
    assert len(plans) == 40
    patients = {p.patient_id: (p.center, p.label) for p in plans}
    assert len(patients) == 30
    for center in ("centerA", "centerB", "centerC"):
        labels = [lab for c, lab in patients.values() if c == center]
        assert len(labels) == 10 and sum(labels) == 5


def test_procedural_texture_when_no_source(tmp_path):
    datalist = make_demo_cohort(tmp_path, n_slides=1, n_patients=1, size_um=256, seed=1,
                                texture_source=tmp_path / "missing.svs", show_progress=False)
    info = (tmp_path / "cohort_info.csv").read_text()
    assert "procedural" in info
    assert load_datalist(datalist)[0].path.exists()
