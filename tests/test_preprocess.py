"""Preprocessing on real slides (../shared/data/slides) and on a pyramidal TIFF written here."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from scripts.data.datalist import SlideRecord
from scripts.formats.patch_file import read_patch_file
from scripts.workflows.preprocess import PreprocessSettings, PreprocessWorkflow, preprocess_slide
from scripts.wsi import mpp as mpp_lib
from scripts.wsi.grid import choose_level
from scripts.wsi.open import SlideReadError, open_slide
from scripts.wsi.patches import iter_patch_batches
from scripts.wsi.probe import probe_cucim
from scripts.wsi.tissue import TissueParams, tissue_mask

HEADER = "slide_id,path,label,patient_id,center,mpp\n"


def write_datalist(path: Path, rows: list[tuple]) -> Path:
    lines = [HEADER] + [",".join(str(v) for v in (sid, p, "", f"p_{sid}", "c1", mpp)) + "\n" for sid, p, mpp in rows]
    path.write_text("".join(lines))
    return path


def read_summary(out: Path) -> dict[str, dict]:
    with open(out / "preprocess_summary.csv", newline="") as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def make_pyramid(path: Path, mpp0: float = 0.25) -> tuple[Path, tuple[int, int, int, int]]:
    """A JPEG-tiled 3-level TIFF (level 0 at ``mpp0`` um/px, resolution tags in cm) with one tissue block."""
    rng = np.random.default_rng(0)
    height, width = 2048, 1536
    image = np.full((height, width, 3), 240, np.uint8)
    box = (512, 512, 1536, 1536)  # x0, y0, x1, y1 at level 0: 256 x 256 um at 0.25 um/px
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (170, 70, 140)
    image[y0:y1, x0:x1] += rng.integers(0, 30, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    per_cm = 10000.0 / mpp0
    opts = dict(tile=(256, 256), photometric="rgb", compression="jpeg", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, resolution=(per_cm, per_cm), description="synthetic test slide", **opts)
        for factor in (2, 4):
            writer.write(image[::factor, ::factor], subfiletype=1, resolution=(per_cm / factor, per_cm / factor), **opts)
    return path, box


# ------------------------------------------------------------------------------------------- mpp


def test_mpp_candidates_reject_nonsense_and_name_the_fix():
    bad = [mpp_lib.MppCandidate(352.86, "TIFF XResolution (28.34 px per centimeter)")]
    with pytest.raises(mpp_lib.MppError) as info:
        mpp_lib.resolve_mpp("s1", "/x/s1.tif", bad)
    message = str(info.value)
    assert "'s1'" in message and "352.9" in message and "mpp" in message and "--default_mpp" in message
    assert mpp_lib.resolve_mpp("s1", None, bad, default=0.5) == (0.5, "default_mpp (given by the user)")
    assert mpp_lib.resolve_mpp("s1", None, bad + [mpp_lib.MppCandidate(0.2525, "OpenSlide openslide.mpp-x")]) == (
        0.2525, "OpenSlide openslide.mpp-x")
    assert mpp_lib.resolve_mpp("s1", None, bad, override=0.25) == (0.25, "datalist mpp column")


def test_aperio_region_mpp_from_header_not_cucim_spacing(shared_slides):
    path = shared_slides / "cmu-1-small-region.svs"
    with open_slide(path) as handle:
        assert handle.backend == "cucim"
        assert handle.raw.spacing()[0] == pytest.approx(1.0)  # what cuCIM itself says
        assert handle.mpp == pytest.approx(0.499)
        assert handle.mpp_source == "aperio ImageDescription MPP"


def test_tcga_without_mpp_is_a_clear_error(shared_slides):
    with pytest.raises(mpp_lib.MppError) as info:
        open_slide(shared_slides / "tcga-cr-7395-01a-01-ts1.svs", slide_id="tcga")
    assert "'tcga'" in str(info.value) and "'mpp' column" in str(info.value)


def test_choose_level_never_coarser_than_target():
    aperio = [1.0, 2.0005, 4.001]
    assert choose_level(aperio, 0.25, 0.5) == 1  # 0.50013 um/px counts as 0.5
    assert choose_level(aperio, 0.25, 0.4) == 0  # level 1 would be coarser: read level 0, downscale
    assert choose_level(aperio, 1.0, 0.5) == 0  # everything is coarser: level 0, upscaled


# ---------------------------------------------------------------------------------- crash safety


def test_probe_survives_cucim_segfault(shared_slides):
    verdicts = probe_cucim([shared_slides / "boxes.tiff", shared_slides / "cmu-1-small-region.svs"])
    ok, message = verdicts[str(shared_slides / "boxes.tiff")]
    assert not ok and "crashed" in message
    assert verdicts[str(shared_slides / "cmu-1-small-region.svs")][0]  # the file after the crash was probed too
    with open_slide(shared_slides / "boxes.tiff", mpp=0.5) as handle:
        assert handle.backend == "openslide" and handle.level_count == 4
        assert handle.read_region((0, 0), (32, 32), 1).shape == (32, 32, 3)


def test_broken_file_rejected_by_every_reader(shared_slides):
    with pytest.raises(SlideReadError) as info:
        open_slide(shared_slides / "broken.svs")
    assert "cucim" in str(info.value) and "openslide" in str(info.value)


def test_kidney_rgba_comes_back_rgb(shared_slides):
    with open_slide(shared_slides / "kidney-48-5.tif", mpp=0.5) as handle:
        assert handle.backend == "cucim"
        patch = handle.read_region((100, 100), (64, 48), 0)
        assert patch.shape == (48, 64, 3) and patch.dtype == np.uint8


def test_dicom_read_with_pydicom_frames(shared_slides):
    path = shared_slides / "small_dicom.dcm"
    with open_slide(path, mpp=0.5) as handle:
        assert handle.backend == "dicom"
        assert any("Couldn't get image flavor" in note for note in handle.notes)
        assert handle.dimensions == (3236, 2638)
        # a region across four frames equals the frames decoded by pydicom itself
        region = handle.read_region((480, 480), (40, 40), 0)
    import pydicom

    ds = pydicom.dcmread(str(path))
    frames = ds.pixel_array  # (42, 500, 500, 3)
    across = 7
    mosaic = np.concatenate([np.concatenate([frames[0], frames[1]], 1), np.concatenate([frames[across], frames[across + 1]], 1)], 0)
    expected = mosaic[480:520, 480:520].astype(int)
    assert np.abs(region.astype(int) - expected).mean() < 6  # same pixels up to JPEG decoder rounding


def test_batch_of_bad_slides_finishes_with_a_row_each(shared_slides, tmp_path):
    names = ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "broken.svs", "boxes.tiff",
             "small_dicom.dcm", "kidney-48-5.tif", "small_HE_levels.tiff"]
    rows = [(Path(n).stem.replace("_", "-"), shared_slides / n, "") for n in names]
    rows.append(("tcga-at-025", shared_slides / "tcga-cr-7395-01a-01-ts1.svs", 0.25))
    rows.append(("boxes-at-05", shared_slides / "boxes.tiff", 0.5))
    rows.append(("dicom-at-05", shared_slides / "small_dicom.dcm", 0.5))
    datalist = write_datalist(tmp_path / "dl.csv", rows)
    out = tmp_path / "out"
    PreprocessWorkflow(datalist, out, PreprocessSettings(), num_workers=2, progress=False).run()
    summary = read_summary(out)
    assert set(summary) == {r[0] for r in rows}
    status = {k: v["status"] for k, v in summary.items()}
    assert status["cmu-1-small-region"] == "ok"
    assert status["tcga-cr-7395-01a-01-ts1"] == "failed" and "mpp" in summary["tcga-cr-7395-01a-01-ts1"]["error"]
    assert status["broken"] == "failed" and "no reader could open" in summary["broken"]["error"]
    assert status["boxes"] == "failed" and "352.8" in summary["boxes"]["error"]  # read by OpenSlide, mpp refused
    assert status["small-HE-levels"] == "failed" and "352.9" in summary["small-HE-levels"]["error"]
    assert status["small-dicom"] == "failed"  # no PixelSpacing
    assert status["kidney-48-5"] == "failed"  # no resolution metadata at all
    assert summary["boxes-at-05"]["backend"] == "openslide" and status["boxes-at-05"] == "no_tissue"
    assert summary["dicom-at-05"]["backend"] == "dicom" and status["dicom-at-05"] == "ok"
    tcga = summary["tcga-at-025"]
    assert tcga["status"] == "ok" and tcga["level"] == "1" and int(tcga["n_patches"]) > 10
    for sid, row in summary.items():
        h5 = out / "patches" / f"{sid}.h5"
        assert h5.exists() == (row["status"] == "ok"), sid  # no empty bag for no_tissue / failed
    assert (out / "previews" / "boxes-at-05.png").exists()


def test_aperio_patch_count_matches_tissue_area(shared_slides, tmp_path):
    path = shared_slides / "cmu-1-small-region.svs"
    record = SlideRecord("cmu", path, None, "p", "c")
    row = preprocess_slide(record, PreprocessSettings(), tmp_path)
    assert row["status"] == "ok" and row["mpp"] == pytest.approx(0.499) and row["level"] == 0
    # independent tissue estimate: saturation Otsu on full-resolution pixels read by tifffile
    from skimage.filters import threshold_otsu

    rgb = tifffile.imread(path).astype(np.int16)
    sat = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)
    area_mm2 = (sat > threshold_otsu(sat)).sum() * 0.499**2 / 1e6
    patch_mm2 = (256 * 0.5 / 1000) ** 2
    assert 0.6 * area_mm2 / patch_mm2 <= row["n_patches"] <= 1.6 * area_mm2 / patch_mm2
    pf = read_patch_file(tmp_path / "patches" / "cmu.h5")
    assert pf.patch_size == 256 and pf.level == 0 and pf.read_size_level == 257  # 256 * 0.5 / 0.499
    assert pf.attrs["mpp_source"] == "aperio ImageDescription MPP"


# -------------------------------------------------------------------------- synthetic pyramid


def test_pyramid_at_quarter_micron_uses_level_1(tmp_path):
    slide, (x0, y0, x1, y1) = make_pyramid(tmp_path / "syn.tif")
    datalist = write_datalist(tmp_path / "dl.csv", [("syn", slide, "")])
    out = tmp_path / "out"
    settings = PreprocessSettings()
    PreprocessWorkflow(datalist, out, settings, num_workers=0, progress=False).run()
    row = read_summary(out)["syn"]
    assert row["status"] == "ok" and float(row["mpp"]) == pytest.approx(0.25)
    assert row["mpp_source"].startswith("TIFF XResolution")
    pf = read_patch_file(out / "patches" / "syn.h5")
    assert (pf.level, pf.read_size_level, pf.patch_size_level0, pf.level_downsample) == (1, 256, 512, 2.0)
    with h5py.File(out / "patches" / "syn.h5") as handle:
        for key in ("patch_size", "target_mpp", "level", "level_downsample", "mpp"):
            assert key in handle["coords"].attrs and key in handle.attrs
    # the 1024 x 1024 level-0 tissue block holds exactly 2 x 2 patches of 512 level-0 pixels
    assert len(pf.coords) == 4
    assert set(map(tuple, pf.coords.tolist())) == {(x, y) for x in (x0, x0 + 512) for y in (y0, y0 + 512)}
    assert (out / "previews" / "syn.png").exists()

    # re-run: finished slide skipped; overwrite redoes it
    mtime = (out / "patches" / "syn.h5").stat().st_mtime_ns
    PreprocessWorkflow(datalist, out, settings, num_workers=0, progress=False).run()
    assert (out / "patches" / "syn.h5").stat().st_mtime_ns == mtime
    assert "skipped" in read_summary(out)["syn"]["warning"]
    # a slide file replaced since (a redrawn cohort, a rescanned slide) is redone, not reused
    os.utime(slide, ns=(time.time_ns(), time.time_ns() + 10**9))
    PreprocessWorkflow(datalist, out, settings, num_workers=0, progress=False).run()
    assert (out / "patches" / "syn.h5").stat().st_mtime_ns != mtime
    assert "skipped" not in read_summary(out)["syn"]["warning"]
    mtime = (out / "patches" / "syn.h5").stat().st_mtime_ns
    settings.overwrite = True
    PreprocessWorkflow(datalist, out, settings, num_workers=0, progress=False).run()
    assert (out / "patches" / "syn.h5").stat().st_mtime_ns != mtime
    assert not list((out / "patches").glob(".*tmp*"))  # no temporary files left behind

    # overlap 0.5 gives the half-step grid
    settings.overlap = 0.5
    row = preprocess_slide(SlideRecord("syn", slide, None, "p", "c"), settings, tmp_path / "out_overlap")
    assert row["n_patches"] > 4


def test_iter_patch_batches_cucim_matches_fallback(tmp_path):
    slide, _ = make_pyramid(tmp_path / "syn.tif")
    coords = np.array([[512, 512], [1024, 512], [512, 1024], [1024, 1024], [1400, 1900]])  # last one crosses the edge
    fast = list(iter_patch_batches(slide, coords, 256, 1, out_size=224, batch_size=2, num_workers=2))
    slow = list(iter_patch_batches(slide, coords, 256, 1, out_size=224, batch_size=2, backends=("tifffile",)))
    fast_patches = np.concatenate([b for b, _ in fast])
    slow_patches = np.concatenate([b for b, _ in slow])
    assert fast_patches.shape == (5, 224, 224, 3)
    assert np.array_equal(np.concatenate([c for _, c in fast]), coords)
    assert np.abs(fast_patches.astype(int) - slow_patches.astype(int)).mean() < 3
    assert (fast_patches[-1, -20:, -20:] == 255).all()  # outside the slide: white


def test_no_tissue_slide_is_a_warning_row(tmp_path):
    blank = np.full((1024, 1024, 3), 245, np.uint8)
    blank += np.random.default_rng(1).integers(0, 6, blank.shape, dtype=np.uint8)
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, blank, tile=(256, 256), photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    row = preprocess_slide(SlideRecord("blank", path, None, "p", "c"), PreprocessSettings(), tmp_path / "out")
    assert row["status"] == "no_tissue" and "no patch" in row["warning"]
    assert not (tmp_path / "out" / "patches" / "blank.h5").exists()


def test_itk_and_scipy_masks_agree(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as handle:
        thumb = handle.read_scaled(8.0)
    itk_mask, _ = tissue_mask(thumb, 0.499 * 8, TissueParams(backend="itk"))
    sp_mask, _ = tissue_mask(thumb, 0.499 * 8, TissueParams(backend="scipy"))
    iou = (itk_mask & sp_mask).sum() / max(1, (itk_mask | sp_mask).sum())
    assert itk_mask.sum() > 1000 and iou > 0.97


def test_reads_clam_style_patch_file(tmp_path):
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as handle:
        ds = handle.create_dataset("coords", data=np.array([[0, 0], [512, 0]]))
        ds.attrs["patch_level"] = 0
        ds.attrs["patch_size"] = 512
        ds.attrs["downsample"] = np.array([1.0, 1.0])
    pf = read_patch_file(path)
    assert pf.layout == "clam" and pf.level == 0 and pf.read_size_level == 512 and pf.patch_size_level0 == 512
    assert pf.coords.shape == (2, 2)
