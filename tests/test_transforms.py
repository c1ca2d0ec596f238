"""Slide -> patch grid as MONAI dictionary transforms declared in the configs, swappable by override."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.data.wsi_reader import BaseWSIReader
from monai.transforms import Compose, MapTransform

USER_MODULE = '''
from scripts.transforms import TissueMaskd


class LeftHalfTissue(TissueMaskd):
    """A user's tissue step: the bundle's mask, right half of the slide dropped."""

    def __call__(self, data):
        d = super().__call__(data)
        mask = d["tissue_mask"].copy()
        mask[:, mask.shape[1] // 2:] = False
        d["tissue_mask"] = mask
        return d
'''


def parse(bundle_root, name, **overrides):
    """``name``'s config file, alone (inference.json included: it is complete on its own)."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / name))
    parser.update({"bundle_root": str(bundle_root), **overrides})
    return parser


@pytest.mark.parametrize("name", ["preprocess.json", "inference.json"])
def test_configs_declare_reader_and_transforms(bundle_root, name):
    parser = parse(bundle_root, name)
    assert isinstance(parser.get_parsed_content("reader"), BaseWSIReader)
    compose = parser.get_parsed_content("slide_transforms")
    assert isinstance(compose, Compose)
    steps = [type(t).__name__ for t in compose.transforms]
    assert steps == ["OpenSlided", "TissueMaskd", "PatchGridd"]
    assert all(isinstance(t, MapTransform) for t in compose.transforms)
    assert compose.transforms[0].reader is parser.get_parsed_content("reader")


def test_extract_config_reads_patches_through_the_reader_component(bundle_root):
    parser = parse(bundle_root, "extract.json", reader_backend="tifffile", allow_random_weights=True,
                   encoder_weights="/nonexistent.pth")
    reader = parser.get_parsed_content("reader")
    assert isinstance(reader, BaseWSIReader) and reader.backends == ("tifffile",)
    workflow = parser.get_parsed_content("workflow")
    assert workflow.backends == ("tifffile",)
    compose = parser.get_parsed_content("extract_transforms")
    assert isinstance(compose, Compose) and workflow.slide_transforms is compose
    assert [type(t).__name__ for t in compose.transforms] == ["OpenSlided", "ReadPatchesd"]
    assert compose.transforms[0].reader is reader
    assert type(workflow.encoder_transform).__name__ == "EncoderInputd"
    assert workflow.encoder_transform.encoder is parser.get_parsed_content("encoder")


USER_INPUT_MODULE = '''
import torch

from scripts.transforms import EncoderInputd


class MirroredInput(EncoderInputd):
    """A user's encoder-input step: patches mirrored left-right, then the encoder's own preprocessing."""

    def __call__(self, data):
        d = dict(data)
        d["patches"] = torch.flip(torch.as_tensor(d["patches"]), dims=[2])
        return super().__call__(d)
'''


def test_user_encoder_input_swapped_by_override_changes_the_features(bundle_root, shared_slides, tmp_path, monkeypatch):
    """extract.json runs its declared transforms: the CMU-1 region's features are the encoder's output on the
    patches the reader component reads, and a one-line override of ``encoder_transform`` changes them."""
    import h5py
    import torch

    from scripts.wsi.patches import iter_patch_batches

    (tmp_path / "user_input.py").write_text(USER_INPUT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    slide = shared_slides / "cmu-1-small-region.svs"
    coords = np.array([[600, 500], [857, 500], [1200, 900]], dtype=np.int64)
    out = tmp_path / "out"
    (out / "patches").mkdir(parents=True)
    with h5py.File(out / "patches" / "cmu.h5", "w") as h5:
        h5["coords"] = coords
        h5.attrs.update(patch_size=256, target_mpp=0.5, level=0, level_downsample=1.0, mpp=0.499,
                        patch_size_level0=257, slide_path=str(slide))
    datalist = tmp_path / "datalist.csv"
    datalist.write_text(f"slide_id,path\ncmu,{slide}\n")
    patches = np.concatenate([b for b, _ in iter_patch_batches(slide, coords, 257, 0, 256, backends=("openslide",))])
    features = {}
    for label, overrides in (("bundle", {}), ("user", {"encoder_transform#_target_": "user_input.MirroredInput"})):
        parser = parse(bundle_root, "extract.json", datalist=str(datalist), output_dir=str(out), overwrite=True,
                       encoder_weights="/nonexistent.pth", allow_random_weights=True, batch_size=2, **overrides)
        parser["workflow"]["progress"] = False
        rows = parser.get_parsed_content("workflow").run()
        assert [r["status"] for r in rows] == ["ok"], rows
        with h5py.File(out / "features" / "cmu.h5", "r") as h5:
            features[label] = h5["features"][()]
        encoder = parser.get_parsed_content("encoder")
    sys.modules.pop("user_input", None)
    images = torch.from_numpy(patches)
    np.testing.assert_allclose(features["bundle"], encoder(images).numpy(), atol=1e-4)
    np.testing.assert_allclose(features["user"], encoder(torch.flip(images, dims=[2])).numpy(), atol=1e-4)
    assert np.abs(features["user"] - features["bundle"]).max() > 1e-2


def test_user_tissue_transform_swapped_by_override_changes_the_grid(bundle_root, shared_slides, tmp_path, monkeypatch):
    (tmp_path / "user_tissue.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    slide = {"image": str(shared_slides / "cmu-1-small-region.svs"), "slide_id": "cmu", "mpp": None}
    grids = {}
    for label, overrides in (("bundle", {}), ("user", {"tissue_transform#_target_": "user_tissue.LeftHalfTissue"})):
        parser = parse(bundle_root, "preprocess.json", mask_backend="scipy", **overrides)
        data = parser.get_parsed_content("slide_transforms")(dict(slide))
        data["wsi"].close()
        grids[label] = data["grid"]
    sys.modules.pop("user_tissue", None)
    bundle, user = grids["bundle"], grids["user"]
    assert len(bundle.coords) > len(user.coords) > 0
    width = 2220
    assert (user.coords[:, 0] + user.patch_size_level0 <= width // 2 + user.patch_size_level0).all()
    assert set(map(tuple, user.coords)) < set(map(tuple, bundle.coords))  # same grid, fewer patches
    assert bundle.mpp == pytest.approx(0.499)  # the trusted Aperio value through the reader component


def test_encoder_input_matches_the_encoders_preprocessing():
    import torch

    from scripts.networks.encoders import build_encoder
    from scripts.transforms import EncoderInputd

    encoder = build_encoder("ctranspath", weights="/nonexistent.pth", allow_random_weights=True)
    batch = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    expected = encoder.preprocess(torch.from_numpy(batch))
    own = EncoderInputd("patches")({"patches": batch})["patches"]
    via_encoder = EncoderInputd("patches", encoder=encoder)({"patches": batch})["patches"]
    assert torch.allclose(own, expected, atol=1e-6) and torch.equal(via_encoder, expected)


def test_inference_reads_patches_with_extract_jsons_transforms(bundle_root):
    """inference.json extracts features with the per-slide transforms it declares (extract.json's blocks),
    opened by its own patch reader (extract.json's ``reader``: no µm/px required, the grid is known)."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "allow_random_weights": True, "encoder_weights": "/nonexistent.pth"})
    stage = parser.get_parsed_content("feature_stage")
    compose = stage.options["slide_transforms"]
    assert compose is parser.get_parsed_content("extract_transforms")
    assert [type(t).__name__ for t in compose.transforms] == ["OpenSlided", "ReadPatchesd"]
    assert compose.transforms[0].reader is parser.get_parsed_content("patch_reader")
    assert parser.get_parsed_content("patch_reader").require_mpp is False
