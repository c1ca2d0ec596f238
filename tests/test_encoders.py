"""The encoder registry: other encoders by name, local weights only, strict loading, own preprocessing."""

from __future__ import annotations

import pytest
import torch

from scripts.networks.ctranspath import WeightsError
from scripts.networks.encoders import ENCODERS, build_encoder


def test_resnet50_trunc_loads_torchvision_weights_and_gives_1024(tmp_path):
    from torchvision.models import resnet50

    full = resnet50(weights=None).eval()
    torch.save(full.state_dict(), tmp_path / "resnet50.pth")  # torchvision's layout, with layer4 and fc
    enc = build_encoder("resnet50_trunc", weights=tmp_path / "resnet50.pth")
    assert enc.feature_dim == 1024 and len(enc.weights_sha256) == 64
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    feats = enc(images)
    assert feats.shape == (2, 1024) and feats.dtype == torch.float32
    with torch.inference_mode():  # the same as torchvision's network cut after layer 3
        x = enc.preprocess(images)
        x = full.layer3(full.layer2(full.layer1(full.maxpool(full.relu(full.bn1(full.conv1(x)))))))
        assert torch.allclose(feats, x.mean(dim=(2, 3)), atol=1e-5)


def test_timm_model_by_name_uses_its_own_preprocessing(tmp_path):
    import timm

    model = timm.create_model("resnet18", pretrained=False)  # with its classifier: dropped on load
    torch.save({"state_dict": model.state_dict()}, tmp_path / "r18.pth")
    enc = build_encoder("timm:resnet18", weights=tmp_path / "r18.pth")
    assert enc.feature_dim == 512 and enc.input_size == 224
    assert enc(torch.zeros(1, 224, 224, 3, dtype=torch.uint8)).shape == (1, 512)
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4.0.conv1")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="layer4.0.conv1.weight"):
        build_encoder("timm:resnet18", weights=tmp_path / "bad.pth")


def test_random_weights_are_seeded_and_stamped(tmp_path):
    a = build_encoder("timm:resnet18", weights=tmp_path / "absent.pth", allow_random_weights=True, seed=3)
    b = build_encoder("timm:resnet18", weights=tmp_path / "absent.pth", allow_random_weights=True, seed=3)
    assert a.weights_sha256 == "random" and a.random_weights
    x = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    assert torch.equal(a(x), b(x))
    with pytest.raises(WeightsError, match="absent.pth not found"):
        build_encoder("timm:resnet18", weights=tmp_path / "absent.pth")


def test_unknown_names():
    assert {"ctranspath", "chief_ctranspath", "resnet50_trunc"} <= set(ENCODERS)
    with pytest.raises(KeyError, match="unknown encoder"):
        build_encoder("uni2")
    with pytest.raises(KeyError, match="timm has no model"):
        build_encoder("timm:not_a_model")
