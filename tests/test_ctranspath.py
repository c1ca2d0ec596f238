"""CTransPath on timm 1.x equals the reference (timm 0.5.4 + TransPath's conv stem) on the released format."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from scripts.networks.ctranspath import (
    ConvStem,
    WeightsError,
    build_ctranspath,
    ctranspath,
    load_checkpoint_file,
    load_ctranspath_state_dict,
)


def _reference_ctranspath() -> nn.Module:
    """CTransPath as TransPath's ctran.py builds it, on timm 0.5.4 (package timm-ctp), written here afresh."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_ctp = pytest.importorskip("timm_ctp", reason="the reference timm (pip install --no-deps timm-ctp==0.5.4)")
    from timm_ctp.models.layers.helpers import to_2tuple

    class ReferenceConvStem(nn.Module):
        # timm 0.5.4 calls the stem with these four arguments and wants tokens (B, L, C) back
        def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=768, norm_layer=None):
            super().__init__()
            self.img_size = to_2tuple(img_size)
            self.patch_size = to_2tuple(patch_size)
            self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            c = embed_dim // 8
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(2 * c),
                nn.ReLU(inplace=True),
                nn.Conv2d(2 * c, embed_dim, 1),
            )
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x):
            return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm 0.5.4 on torch 2.x: meshgrid indexing notice
        model = timm_ctp.create_model("swin_tiny_patch4_window7_224", embed_layer=ReferenceConvStem, pretrained=False)
    model.head = nn.Identity()
    return model


def _randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    # fresh BatchNorm statistics are 0/1, which would hide a mix-up of running_mean and running_var
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    reference = _reference_ctranspath().eval()
    with torch.no_grad():
        _randomise_batchnorm(reference, torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("ctp") / "ctranspath.pth"
    torch.save({"model": reference.state_dict()}, path)  # the released file's layout
    return reference, path


def test_released_layout_is_what_we_expect(reference_checkpoint):
    _, path = reference_checkpoint
    sd = torch.load(path, weights_only=True)["model"]
    assert "layers.0.downsample.reduction.weight" in sd and "layers.3.downsample.reduction.weight" not in sd
    assert any(k.endswith("relative_position_index") for k in sd)
    assert any(k.endswith("attn_mask") for k in sd)
    assert "patch_embed.proj.6.weight" in sd and not any(k.startswith("head") for k in sd)


def test_equals_reference_model(reference_checkpoint):
    reference, path = reference_checkpoint
    ours = ctranspath(path)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = reference(x)
        got = ours(x)
    assert got.shape == expected.shape == (3, 768)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, f"max abs difference {diff}"
    assert expected.std() > 0.1  # a non-trivial output, not all zeros


def test_plain_state_dict_and_module_prefix(reference_checkpoint, tmp_path):
    reference, path = reference_checkpoint
    sd = torch.load(path, weights_only=True)["model"]
    resaved = ctranspath(path).state_dict()  # already in the timm 1.x layout (downsample at stage start)
    assert "layers.1.downsample.reduction.weight" in resaved and "layers.0.downsample.reduction.weight" not in resaved
    checkpoints = {
        "plain.pth": sd,
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "timm1x.pth": resaved,
    }
    for name, ckpt in checkpoints.items():
        torch.save(ckpt, tmp_path / name)
        model = ctranspath(tmp_path / name)
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            assert (model(x) - reference(x)).abs().max() < 1e-4


def test_missing_and_unexpected_keys_are_named(reference_checkpoint):
    _, path = reference_checkpoint
    sd = dict(torch.load(path, weights_only=True)["model"])
    sd.pop("norm.weight")
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        load_ctranspath_state_dict(build_ctranspath(), {"model": sd}, source="x.pth")
    assert "norm.weight" in str(err.value) and "extra.thing" in str(err.value) and "x.pth" in str(err.value)


def test_missing_file_says_where_to_get_weights(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_checkpoint_file(tmp_path / "nope.pth")
    msg = str(err.value)
    assert "nope.pth" in msg and "TransPath" in msg and "models/ctranspath.pth" in msg and "Hugging Face" in msg


def test_stem_speaks_timm_1x():
    stem = ConvStem(img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=nn.LayerNorm,
                    strict_img_size=True, output_fmt="NHWC")
    assert stem(torch.zeros(1, 3, 224, 224)).shape == (1, 56, 56, 96)
    assert [n for n, _ in stem.named_parameters()][:2] == ["proj.0.weight", "proj.1.weight"]
