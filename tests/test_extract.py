"""Feature extraction: correct patches at the recorded level, same order as the patch file, resumable,
one bad slide never stops the rest, CLI through the MONAI bundle runner, sharding over two ranks."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from scripts.networks.encoders import build_encoder
from scripts.workflows.extract import FeatureExtractionWorkflow, read_patch_file
from scripts.wsi.open import open_slide
from scripts.wsi.patches import iter_patch_batches, resize_rgb

# level-0 top-left (x, y) of the patches written for every test slide; read at level 1 (0.5 um/px)
COORDS = np.array([[0, 0], [512, 0], [1024, 512]], dtype=np.int64)


def read_patches(slide, coords, level, read_size, out_size, backend, **kw) -> np.ndarray:
    """Every patch of ``coords`` through the bundle's reader with one backend, as one (N, out, out, 3) array."""
    batches = iter_patch_batches(slide, coords, read_size, level, out_size, backends=(backend,), **kw)
    return np.concatenate([patches for patches, _ in batches])


def make_slide(path: Path, seed: int) -> np.ndarray:
    """A 1536x1024 two-level JPEG-tiled pyramid at 0.25 um/px (levels as separate pages); returns level 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1024, 0:1536]
    image = np.stack([(xx * (seed + 1)) % 256, (yy * 3) % 256, ((xx + yy) // 4) % 256], -1)
    image = (image * 0.7 + rng.integers(0, 70, image.shape)).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), compression="jpeg", photometric="rgb",
                  resolution=(40000, 40000), resolutionunit="CENTIMETER")
        tif.write(image[::2, ::2], tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1)
    return image[::2, ::2]


def write_patch_file(path: Path, slide: Path, coords=COORDS, level=1, downsample=2.0, mpp=0.25, with_level0=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["coords"] = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        h5.attrs.update(patch_size=256, target_mpp=0.5, level=level, level_downsample=downsample, mpp=mpp,
                        slide_path=str(slide))
        if with_level0:
            h5.attrs["patch_size_level0"] = int(round(256 * 0.5 / mpp))


def make_cohort(root: Path, n_slides: int) -> tuple[Path, Path]:
    """n pyramid TIFFs, their patch files under root/out/patches and a datalist; returns (datalist, out)."""
    out = root / "out"
    rows = []
    for i in range(n_slides):
        slide = root / f"slide{i}.tif"
        make_slide(slide, seed=i)
        write_patch_file(out / "patches" / f"s{i}.h5", slide)
        rows.append({"slide_id": f"s{i}", "path": slide.name, "label": i % 2, "patient_id": f"p{i}", "center": "c0"})
    datalist = root / "datalist.csv"
    with open(datalist, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return datalist, out


def summary(out: Path) -> dict[str, dict]:
    with open(out / "extract_summary.csv", newline="") as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def features_of(out: Path, slide_id: str) -> np.ndarray:
    with h5py.File(out / "features" / f"{slide_id}.h5", "r") as h5:
        return h5["features"][()]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    # a weights path that does not exist forces seeded random weights even where models/ctranspath.pth exists
    return build_encoder("ctranspath", weights=tmp_path_factory.mktemp("w") / "absent.pth", allow_random_weights=True)


def run_workflow(datalist, out, encoder, **kw):
    kw.setdefault("progress", False)
    return FeatureExtractionWorkflow(datalist, out, encoder, device="cpu", **kw).run()


def bundle_cmd(bundle_root: Path, datalist: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle_root / "configs/extract.json"),
            "--datalist", str(datalist), "--output_dir", str(out), *extra]


def bundle_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------------------ tests
def test_readers_agree_at_level_1(tmp_path):
    slide = tmp_path / "a.tif"
    level1 = make_slide(slide, seed=3)
    results = {b: read_patches(slide, COORDS, 1, 256, 256, b, batch_size=2, num_workers=2)
               for b in ("cucim", "openslide", "tifffile")}
    for name, patches in results.items():
        assert patches.shape == (3, 256, 256, 3) and patches.dtype == np.uint8, name
        np.testing.assert_array_equal(patches, results["tifffile"], err_msg=name)
    # the region really is the one at level 1 (JPEG is lossy: compare 8x8 block means with the original)
    def blocks(a):
        return a.reshape(32, 8, 32, 8, 3).astype(float).mean(axis=(1, 3))

    x, y = COORDS[2] // 2
    assert np.abs(blocks(results["cucim"][2]) - blocks(level1[y:y + 256, x:x + 256])).mean() < 4
    assert np.abs(blocks(results["cucim"][2]) - blocks(level1[y:y + 256, x - 8:x + 248])).mean() > 10


def test_read_size_from_patch_file(tmp_path):
    write_patch_file(tmp_path / "a.h5", tmp_path / "a.tif", mpp=0.2495, with_level0=False, level=0, downsample=1.0)
    assert read_patch_file(tmp_path / "a.h5").read_size == round(256 * 0.5 / 0.2495)
    write_patch_file(tmp_path / "b.h5", tmp_path / "a.tif")
    info = read_patch_file(tmp_path / "b.h5")
    assert (info.read_size, info.level, info.patch_size) == (256, 1, 256)
    with h5py.File(tmp_path / "b.h5", "r+") as h5:  # preprocessing's own figure wins when present
        h5.attrs["read_size_level"] = 255
    assert read_patch_file(tmp_path / "b.h5").read_size == 255
    with pytest.raises(Exception, match="run the preprocessing"):
        read_patch_file(tmp_path / "missing.h5")


def test_features_are_the_encoder_of_the_recorded_patches(tmp_path, encoder):
    datalist, out = make_cohort(tmp_path, 2)
    rows = run_workflow(datalist, out, encoder, batch_size=2)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for i in range(2):
        with h5py.File(out / "features" / f"s{i}.h5", "r") as h5, h5py.File(out / "patches" / f"s{i}.h5", "r") as p5:
            assert h5["features"].shape == (3, 768) and h5["features"].dtype == np.float32
            np.testing.assert_array_equal(h5["coords"][()], p5["coords"][()])
            assert h5.attrs["encoder"] == "ctranspath" and h5.attrs["weights_sha256"] == "random"
            assert h5.attrs["patch_size"] == 256 and h5.attrs["mpp"] == 0.25
            got = h5["features"][()]
        patches = read_patches(tmp_path / f"slide{i}.tif", COORDS, 1, 256, 256, "tifffile")
        expected = encoder(torch.from_numpy(patches)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
    rows = summary(out)
    assert rows["s0"]["n_patches"] == "3" and float(rows["s0"]["patches_per_s"]) > 0
    assert rows["s0"]["weights_sha256"] == "random" and rows["s0"]["encoder"] == "ctranspath"


def test_real_aperio_slide(shared_slides, tmp_path, encoder):
    slide = shared_slides / "cmu-1-small-region.svs"
    coords = np.array([[600, 900], [1200, 1500], [240, 480]], dtype=np.int64)
    out = tmp_path / "out"
    write_patch_file(out / "patches" / "cmu1.h5", slide, coords=coords, level=0, downsample=1.0, mpp=0.499,
                     with_level0=False)
    datalist = tmp_path / "datalist.csv"
    datalist.write_text(f"slide_id,path,label,patient_id,center\ncmu1,{slide},,p1,c1\n")
    rows = run_workflow(datalist, out, encoder)
    assert rows[0]["status"] == "ok", rows
    with h5py.File(out / "features" / "cmu1.h5", "r") as h5:
        np.testing.assert_array_equal(h5["coords"][()], coords)
        assert h5.attrs["mpp"] == pytest.approx(0.499) and h5.attrs["read_size"] == 257  # round(256 * 0.5 / 0.499)
        got = h5["features"][()]
    import openslide

    with openslide.OpenSlide(str(slide)) as osr:
        patches = np.stack([np.asarray(osr.read_region((int(x), int(y)), 0, (257, 257)))[..., :3] for x, y in coords])
    patches = np.stack([resize_rgb(patch, 256) for patch in patches])
    assert patches.shape == (3, 256, 256, 3)
    np.testing.assert_allclose(got, encoder(torch.from_numpy(patches)).numpy(), atol=1e-4)


def test_cucim_batches_are_copied_before_the_iterator_advances(shared_slides):
    # cuCIM's batched read_region hands out batches whose np.asarray view points into a buffer it frees or
    # reuses on the next step: every batch must equal a one-patch-at-a-time read of the same coordinates
    slide = shared_slides / "cmu-1-small-region.svs"
    xs, ys = np.arange(0, 2220 - 256, 256), np.arange(0, 2967 - 256, 256)
    coords = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)[:40]
    batches = list(iter_patch_batches(slide, coords, 256, 0, 256, batch_size=6, num_workers=2, backends=("cucim",)))
    assert [len(p) for p, _ in batches] == [6] * 6 + [4]
    np.testing.assert_array_equal(np.concatenate([c for _, c in batches]), coords)
    with open_slide(slide, backends=("cucim",)) as handle:
        assert handle.backend == "cucim"
        for i, (x, y) in enumerate(coords):
            single = handle.read_region((int(x), int(y)), (256, 256), 0)
            np.testing.assert_array_equal(batches[i // 6][0][i % 6], single, err_msg=f"patch {i} at {(x, y)}")


def test_slide_that_crashes_cucim_is_read_by_a_fallback(shared_slides, tmp_path, encoder):
    # cuCIM 26.10 segfaults on boxes.tiff: extraction must read it with OpenSlide and the process live on
    slide = shared_slides / "boxes.tiff"
    coords = np.array([[0, 0], [40, 0], [20, 10]], dtype=np.int64)
    out = tmp_path / "out"
    write_patch_file(out / "patches" / "boxes.h5", slide, coords=coords, level=0, downsample=1.0, mpp=0.5,
                     with_level0=False)  # read 256 px at level 0 (the slide is 300 x 250: edges come back white)
    datalist = tmp_path / "datalist.csv"
    datalist.write_text(f"slide_id,path,label,patient_id,center,mpp\nboxes,{slide},,p1,c1,0.5\n")
    rows = run_workflow(datalist, out, encoder)
    assert rows[0]["status"] == "ok", rows
    with h5py.File(out / "features" / "boxes.h5", "r") as h5:
        assert h5.attrs["reader"] == "openslide"
        got = h5["features"][()]
    patches = read_patches(slide, coords, 0, 256, 256, "openslide")
    assert (patches[0, 250:] == 255).all() and (patches[2, 240:] == 255).all() and not (patches[1] == 255).all()
    np.testing.assert_allclose(got, encoder(torch.from_numpy(patches)).numpy(), atol=1e-4)
    # cuCIM alone: a failed row that says why, not a dead process
    from scripts.utils.errors import AllSlidesFailedError

    with pytest.raises(AllSlidesFailedError, match="every slide failed") as raised:  # its only slide: non-zero exit
        run_workflow(datalist, tmp_path / "out", encoder, reader_backend="cucim", overwrite=True)
    assert "crashed" in str(raised.value)
    assert summary(tmp_path / "out")["boxes"]["status"] == "failed"


def test_one_bad_slide_is_reported_and_others_go_on(tmp_path, encoder):
    datalist, out = make_cohort(tmp_path, 2)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff" * 100)
    write_patch_file(out / "patches" / "bad.h5", broken)
    with open(datalist, "a") as handle:
        handle.write("bad,broken.tif,0,p9,c0\nnopatches,slide0.tif,1,p8,c0\n")
    rows = {r["slide_id"]: r for r in run_workflow(datalist, out, encoder)}
    assert rows["s0"]["status"] == rows["s1"]["status"] == "ok"
    assert rows["bad"]["status"] == "failed" and "broken.tif" in rows["bad"]["error"]
    assert rows["nopatches"]["status"] == "failed" and "preprocess" in rows["nopatches"]["error"]
    assert not (out / "features" / "bad.h5").exists()
    assert set(summary(out)) == {"s0", "s1", "bad", "nopatches"}
    assert not [p for p in (out / "features").iterdir() if p.name.startswith(".")]  # no temporary left


def test_failure_mid_slide_leaves_no_partial_file(tmp_path, encoder):
    datalist, out = make_cohort(tmp_path, 3)

    class FailsOnFourthBatch:  # the encoder dies half-way through slide s1 (batches of 2: s0 = 2, s1 = 2)
        calls = 0

        def __getattr__(self, name):
            return getattr(encoder, name)

        def to(self, device):
            return self

        def embed(self, x):  # the network call extraction makes on each preprocessed batch
            FailsOnFourthBatch.calls += 1
            if FailsOnFourthBatch.calls == 4:
                raise RuntimeError("simulated out-of-memory")
            return encoder.embed(x)

    rows = {r["slide_id"]: r for r in run_workflow(datalist, out, FailsOnFourthBatch(), batch_size=2)}
    assert rows["s1"]["status"] == "failed" and "simulated out-of-memory" in rows["s1"]["error"]
    assert rows["s0"]["status"] == rows["s2"]["status"] == "ok"
    assert sorted(p.name for p in (out / "features").iterdir()) == ["s0.h5", "s2.h5"]


def test_empty_patch_file(tmp_path, encoder):
    datalist, out = make_cohort(tmp_path, 1)
    write_patch_file(out / "patches" / "s0.h5", tmp_path / "slide0.tif", coords=np.zeros((0, 2)))
    assert run_workflow(datalist, out, encoder)[0]["status"] == "empty"
    assert features_of(out, "s0").shape == (0, 768)


def test_interrupted_slide_is_redone_and_finished_ones_skipped(tmp_path, encoder):
    datalist, out = make_cohort(tmp_path, 3)
    run_workflow(datalist, out, encoder)
    reference = {s: features_of(out, s) for s in ("s0", "s1", "s2")}
    # what a killed run leaves: s0 done, s1 half-written under its temporary name, s2 not started
    stamp = (out / "features" / "s0.h5").stat().st_mtime_ns
    (out / "features" / "s1.h5").rename(out / "features" / ".s1.a1b2c3d4.tmp.h5")
    (out / "features" / "s2.h5").unlink()
    with h5py.File(out / "features" / ".s1.a1b2c3d4.tmp.h5", "r+") as h5:
        h5["features"][1:] = 0
    rows = {r["slide_id"]: r["status"] for r in run_workflow(datalist, out, encoder)}
    assert rows == {"s0": "skipped", "s1": "ok", "s2": "ok"}
    assert (out / "features" / "s0.h5").stat().st_mtime_ns == stamp
    assert not (out / "features" / ".s1.a1b2c3d4.tmp.h5").exists()
    for slide_id, expected in reference.items():
        np.testing.assert_array_equal(features_of(out, slide_id), expected)
    # a changed patch file makes its slide stale
    write_patch_file(out / "patches" / "s2.h5", tmp_path / "slide2.tif", coords=COORDS[:2])
    rows = {r["slide_id"]: r["status"] for r in run_workflow(datalist, out, encoder)}
    assert rows == {"s0": "skipped", "s1": "skipped", "s2": "ok"} and features_of(out, "s2").shape == (2, 768)
    # a slide file replaced since (same coordinates) makes its features stale too
    slide1 = tmp_path / "slide1.tif"
    os.utime(slide1, ns=(time.time_ns(), slide1.stat().st_mtime_ns + 10**9))
    rows = {r["slide_id"]: r["status"] for r in run_workflow(datalist, out, encoder)}
    assert rows == {"s0": "skipped", "s1": "ok", "s2": "skipped"}


def test_missing_weights_is_a_clear_error(tmp_path):
    from scripts.networks.ctranspath import WeightsError

    with pytest.raises(WeightsError) as err:
        build_encoder("ctranspath", weights=tmp_path / "ctranspath.pth")
    assert "Xiyue-Wang/TransPath" in str(err.value) and "models/ctranspath.pth" in str(err.value)


def test_bundle_cli_without_weights_says_where_to_get_them(bundle_root, tmp_path):
    datalist, out = make_cohort(tmp_path, 1)
    proc = subprocess.run(bundle_cmd(bundle_root, datalist, out, "--encoder_weights", str(tmp_path / "none.pth")),
                          cwd=bundle_root, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "none.pth not found" in proc.stdout + proc.stderr and "Xiyue-Wang/TransPath" in proc.stdout + proc.stderr
    assert not (out / "features").exists() or not list((out / "features").iterdir())


@pytest.mark.slow
def test_bundle_cli_killed_then_restarted_equals_uninterrupted(bundle_root, tmp_path, encoder):
    datalist, out = make_cohort(tmp_path, 5)
    common = ("--allow_random_weights", "true", "--batch_size", "1", "--num_threads", "1")
    # kill -9 as soon as the first slide is written (the next one is then half-way)
    proc = subprocess.Popen(bundle_cmd(bundle_root, datalist, out, *common), cwd=bundle_root, env=bundle_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "features" / "s0.h5").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "features").glob("s*.h5"))
    assert 1 <= len(done) < 5, "the run finished before it could be killed"
    # restart: finishes the rest, skips what was complete, leaves no temporary file
    subprocess.run(bundle_cmd(bundle_root, datalist, out, *common), cwd=bundle_root, env=bundle_env(),
                   check=True, capture_output=True, timeout=300)
    statuses = {k: v["status"] for k, v in summary(out).items()}
    assert all(statuses[name[:-3]] == "skipped" for name in done)
    assert list(statuses.values()).count("ok") == 5 - len(done)
    assert not [p for p in (out / "features").iterdir() if p.name.startswith(".")]
    # an uninterrupted run (same seed, same batch size, in this process) gives the same features
    clean = tmp_path / "clean"
    shutil.copytree(out / "patches", clean / "patches")
    run_workflow(datalist, clean, encoder, batch_size=1)
    for i in range(5):
        np.testing.assert_allclose(features_of(out, f"s{i}"), features_of(clean, f"s{i}"), atol=1e-5)
        with h5py.File(out / "features" / f"s{i}.h5", "r") as h5:
            assert h5.attrs["weights_sha256"] == "random"


@pytest.mark.slow
def test_two_ranks_write_every_slide_exactly_once(bundle_root, tmp_path):
    datalist, out = make_cohort(tmp_path, 5)
    # as documented: torchrun --nproc_per_node=N -m monai.bundle run --config_file configs/extract.json ...
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *bundle_cmd(bundle_root, datalist, out, "--allow_random_weights", "true")[1:]]
    env = bundle_env()
    proc = subprocess.run(cmd, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "extract_summary.csv", newline="") as handle:
        listed = [row["slide_id"] for row in csv.DictReader(handle)]
    assert listed == [f"s{i}" for i in range(5)]  # each slide reported once, by the rank that wrote it
    assert {r["status"] for r in summary(out).values()} == {"ok"}
    ranks = {}
    for i in range(5):
        with h5py.File(out / "features" / f"s{i}.h5", "r") as h5:
            assert h5.attrs["world_size"] == 2
            ranks[f"s{i}"] = int(h5.attrs["rank"])
    assert ranks == {f"s{i}": i % 2 for i in range(5)}  # datalist order, dealt round-robin
    assert len(list((out / "features").iterdir())) == 5


def test_clam_coordinate_file_is_read(tmp_path):
    """CLAM keeps patch_level / patch_size on the coords dataset, not the file root."""
    coords = np.array([[0, 0], [512, 0]], dtype=np.int64)
    with h5py.File(tmp_path / "clam.h5", "w") as h5:
        dataset = h5.create_dataset("coords", data=coords)
        dataset.attrs["patch_level"] = 1
        dataset.attrs["patch_size"] = 256
        dataset.attrs["downsample"] = np.array([2.0, 2.0])
    info = read_patch_file(tmp_path / "clam.h5", tmp_path / "slide.tif")
    assert (info.level, info.read_size, info.patch_size) == (1, 256, 256)
    np.testing.assert_array_equal(info.coords, coords)
    assert info.slide_path == tmp_path / "slide.tif"


def test_extract_slide_is_the_workflows_per_slide_stage(tmp_path, encoder):
    """The public per-slide function gives the workflow's features, resumes, and reports a bad slide as a row."""
    from scripts.data.datalist import load_datalist
    from scripts.workflows.extract import extract_slide

    datalist, out = make_cohort(tmp_path, 2)
    record = load_datalist(datalist, require_labels=False)[0]
    row = extract_slide(record, encoder, out, batch_size=2)
    assert row["status"] == "ok" and row["n_patches"] == 3
    got = features_of(out, "s0")
    patches = read_patches(tmp_path / "slide0.tif", COORDS, 1, 256, 256, "tifffile")
    np.testing.assert_allclose(got, encoder(torch.from_numpy(patches)).numpy(), atol=1e-4)
    assert extract_slide(record, encoder, out)["status"] == "skipped"
    (out / "patches" / "s1.h5").unlink()
    other = load_datalist(datalist, require_labels=False)[1]
    failed = extract_slide(other, encoder, out)
    assert failed["status"] == "failed" and "s1.h5" in failed["error"]
    assert not (out / "features" / "s1.h5").exists()
