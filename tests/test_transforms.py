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
    """``name``'s config; inference.json as it runs, an overlay on extract.json and preprocess.json."""
    import ast

    from scripts.inference import INFERENCE_CONFIGS

    names = [p.split("/")[-1] for p in ast.literal_eval(INFERENCE_CONFIGS)] if name == "inference.json" else [name]
    parser = ConfigParser()
    parser.read_config([str(bundle_root / "configs" / n) for n in names])
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
    assert parser.get_parsed_content("workflow").backends == ("tifffile",)


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
