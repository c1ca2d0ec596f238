"""BagClassifier: channel-first bags in, (B, 1) logits out; TorchScript export keeps the numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.networks.bag_classifier import BagClassifier
from scripts.networks.base import MILNetwork
from scripts.networks.segment_ops import segment_softmax, segment_sum


class TinyGatedMIL(MILNetwork):
    """Minimal gated-attention MIL built on the segment ops (independent of SMILE)."""

    def __init__(self, in_dim: int = 16, hidden: int = 8):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.gate = nn.Linear(hidden, 4)
        self.value = nn.Linear(hidden, 4)
        self.score = nn.Linear(4, 1)
        self.head = nn.Linear(hidden, 1)

    @property
    def config(self) -> dict:  # properties must not break scripting
        return {"in_dim": self.embed[0].in_features}

    def forward_packed(self, x, bag_index, n_bags: int):
        h = self.embed(x)
        raw = self.score(torch.sigmoid(self.gate(h)) * torch.tanh(self.value(h))).squeeze(-1)
        attention = segment_softmax(raw, bag_index, n_bags)
        pooled = segment_sum(attention.unsqueeze(-1) * h, bag_index, n_bags)
        return {"logits": self.head(pooled).squeeze(-1), "attention": attention}


def _networks():
    yield "tiny", lambda: TinyGatedMIL(16), 16
    try:
        import scripts.networks.smile  # noqa: F401
    except ImportError:
        return
    yield "smile", lambda: BagClassifier("smile").mil, 768


@pytest.mark.parametrize("name,factory,dim", list(_networks()), ids=[n for n, _, _ in _networks()])
def test_channel_first_bag_and_torchscript(name, factory, dim, tmp_path):
    torch.manual_seed(0)
    mil = factory().eval()
    model = BagClassifier(mil).eval()
    bag = torch.randn(23, dim)
    with torch.no_grad():
        expected = mil(bag)  # the network's own single-bag form, (1,)
        out = model(bag.T.unsqueeze(0))
        logits, attention = model.forward_with_attention(bag.T.unsqueeze(0))
    assert out.shape == (1, 1)
    torch.testing.assert_close(out.reshape(1), expected)
    torch.testing.assert_close(logits, out)
    assert attention.shape == (1, 23) and float(attention.sum()) == pytest.approx(1.0, abs=1e-5)

    # channel-last wrapper gives the same numbers
    last = BagClassifier(mil, channel_first=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(last(bag.unsqueeze(0)), out)

    # scripting (what `monai.bundle ckpt_export` does) works and agrees for any bag size, after a save/load
    scripted = torch.jit.script(model)
    path = tmp_path / f"{name}.ts"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    for n in (1, 5, 23):
        sample = torch.randn(1, dim, n)
        with torch.no_grad():
            torch.testing.assert_close(loaded(sample), model(sample), rtol=1e-5, atol=1e-6)
    # the original module is untouched by scripting (its forward still works in Python)
    with torch.no_grad():
        torch.testing.assert_close(mil(bag), expected)


def test_load_mil_state_dict_accepts_both_forms():
    torch.manual_seed(0)
    source = BagClassifier(TinyGatedMIL(16))
    target = BagClassifier(TinyGatedMIL(16))
    target.load_mil_state_dict(source.state_dict())  # mil.* keys
    for a, b in zip(source.parameters(), target.parameters()):
        assert torch.equal(a, b)
    target2 = BagClassifier(TinyGatedMIL(16))
    target2.load_mil_state_dict({f"module.{k}": v for k, v in source.mil.state_dict().items()})  # bare, DDP prefix
    for a, b in zip(source.parameters(), target2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        BagClassifier(TinyGatedMIL(8)).load_mil_state_dict(source.state_dict())


def test_rejects_non_mil_modules_and_bad_shapes():
    with pytest.raises(TypeError, match="forward_packed"):
        BagClassifier(nn.Linear(3, 1))
    model = BagClassifier(TinyGatedMIL(16))
    with pytest.raises(ValueError, match="expected bags"):
        model(torch.randn(1, 1, 16, 4))
