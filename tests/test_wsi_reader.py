"""The bundle's WSI reader as a MONAI component: MONAI's own datasets read slides through it."""

from __future__ import annotations

import numpy as np
import pytest
from monai.data import MaskedPatchWSIDataset, PatchWSIDataset
from monai.data.wsi_reader import BaseWSIReader

from scripts.wsi.reader import SlideWSIReader


@pytest.fixture()
def cmu(shared_slides):
    return shared_slides / "cmu-1-small-region.svs"


def test_reader_is_a_monai_wsi_reader_with_trusted_mpp(cmu):
    reader = SlideWSIReader(backends=("openslide", "tifffile"))
    assert isinstance(reader, BaseWSIReader)
    wsi = reader.read(str(cmu))
    try:
        assert reader.get_size(wsi, 0) == (2967, 2220)  # (height, width)
        assert reader.get_level_count(wsi) == 1
        assert reader.get_downsample_ratio(wsi, 0) == 1.0
        assert reader.get_mpp(wsi, 0) == pytest.approx((0.499, 0.499))  # the Aperio header, not cuCIM's 1.0
        assert reader.get_power(wsi, 0) == pytest.approx(10 / 0.499)
        assert reader.read(str(cmu), mpp=0.25).mpp == 0.25  # a datalist override wins
    finally:
        wsi.close()


def test_patch_wsi_dataset_reads_cmu_through_the_reader(cmu):
    import openslide

    locations = [(0, 0), (1000, 700), (2900, 2100)]  # (y, x); the last one runs past the slide edge
    data = [{"image": str(cmu), "location": loc, "size": (64, 96), "level": 0, "label": 1} for loc in locations]
    dataset = PatchWSIDataset(data, center_location=False, reader=SlideWSIReader())
    direct = openslide.OpenSlide(str(cmu))
    try:
        for item, (y, x) in zip(dataset, locations):
            image = np.asarray(item["image"])
            assert image.shape == (3, 64, 96) and image.dtype == np.uint8
            rgba = np.asarray(direct.read_region((x, y), 0, (96, 64)))
            alpha = rgba[..., 3:4].astype(np.uint16)
            expected = ((rgba[..., :3] * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)  # outside: white
            assert np.array_equal(image.transpose(1, 2, 0), expected)
    finally:
        direct.close()


def test_masked_patch_wsi_dataset_uses_the_readers_pyramid(shared_slides):
    """MaskedPatchWSIDataset reads a whole low level for its tissue mask, so it runs on a small pyramid
    (small_HE_levels.tiff, 4 levels); its patches must equal a direct tifffile read of level 0."""
    import tifffile

    path = shared_slides / "small_HE_levels.tiff"
    reader = SlideWSIReader(backends=("tifffile",), default_mpp=0.5)
    dataset = MaskedPatchWSIDataset([{"image": str(path)}], patch_size=32, patch_level=0, mask_level=2, reader=reader)
    assert len(dataset) > 0
    level0 = tifffile.imread(str(path), level=0)[..., :3]
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[index]
        y, x = (int(v) for v in item["image"].meta["location"]) if hasattr(item["image"], "meta") else item["location"]
        image = np.asarray(item["image"]).transpose(1, 2, 0)
        assert np.array_equal(image, _expected_patch(level0, y, x, 32))


def test_masked_patch_wsi_dataset_on_cmu_through_an_extra_level(cmu):
    """The CMU-1 region has one level (2220 x 2967): MaskedPatchWSIDataset would make one sample per level-0
    pixel of its mask. ``extra_downsamples=(32,)`` gives the reader a level 1 at 1/32 (read from level 0 and
    resized), so the mask has 93 x 69 pixels; the patches it yields at level 0 equal a direct OpenSlide read."""
    import openslide

    reader = SlideWSIReader(backends=("openslide",), extra_downsamples=(32,))
    wsi = reader.read(str(cmu))
    try:
        assert reader.get_level_count(wsi) == 2 and reader.get_downsample_ratio(wsi, 1) == 32.0
        assert reader.get_size(wsi, 1) == (93, 69)
        assert reader.get_mpp(wsi, 1) == pytest.approx((0.499 * 32, 0.499 * 32))
        thumb, _ = reader.get_data(wsi, level=1)
        assert thumb.shape == (3, 93, 69)
        small = np.asarray(openslide.OpenSlide(str(cmu)).read_region((0, 0), 0, (2220, 2967)).convert("RGB"))
        blocks = small[: 92 * 32, : 69 * 32].reshape(92, 32, 69, 32, 3).mean(axis=(1, 3))  # 32 x 32 means
        assert np.abs(thumb.transpose(1, 2, 0)[:92].astype(float) - blocks).mean() < 4
    finally:
        wsi.close()
    dataset = MaskedPatchWSIDataset([{"image": str(cmu)}], patch_size=64, patch_level=0, mask_level=1, reader=reader)
    assert 0 < len(dataset) < 93 * 69  # Otsu on saturation keeps the tissue pixels, not the whole region
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[index]
        y, x = (int(v) for v in item["image"].meta["location"])
        image = np.asarray(item["image"]).transpose(1, 2, 0)
        assert np.array_equal(image, _expected_patch(small, y, x, 64))


def _expected_patch(level0: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """The ``size`` x ``size`` patch at (y, x) of ``level0``, white where it lies past the image's edges."""
    expected = np.full((size, size, 3), 255, np.uint8)
    y0, x0 = max(y, 0), max(x, 0)
    crop = level0[y0 : y + size, x0 : x + size]
    expected[y0 - y : y0 - y + crop.shape[0], x0 - x : x0 - x + crop.shape[1]] = crop
    return expected


def test_reading_layers_import_one_way():
    """mpp and filekind never import a reader; backends never import the fallback chain or the component."""
    import ast
    from pathlib import Path

    wsi = Path(__file__).resolve().parents[1] / "scripts" / "wsi"

    def imports(path):
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    readers = {"scripts.wsi.reader", "scripts.wsi.open", "scripts.wsi.patches", "scripts.wsi.probe"}
    assert not imports(wsi / "mpp.py") & (readers | {"scripts.wsi.backends"})
    assert not imports(wsi / "filekind.py") & readers
    for backend in (wsi / "backends").glob("*.py"):
        assert not imports(backend) & readers, backend.name
