"""Segment reductions accumulate in float32 whatever the input dtype (bf16 autocast included)."""

import torch

from scripts.networks.segment_ops import segment_mean, segment_softmax, segment_sum
from scripts.networks.smile import SMILE


def _bags(sizes=(1000, 7, 300)):
    bag_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return bag_index, len(sizes)


def test_bf16_attention_over_1000_instances_sums_to_one():
    bag_index, n = _bags()
    logits = torch.randn(bag_index.numel(), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weights = segment_softmax(logits, bag_index, n)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(segment_sum(weights, bag_index, n), torch.ones(n), rtol=0, atol=1e-5)
    # the same weights rounded to bf16 and summed in bf16 (the old behaviour) are visibly off
    w16 = weights.to(torch.bfloat16)
    naive = w16.new_zeros(n).index_add(0, bag_index, w16)
    assert float((naive.float() - 1).abs().max()) > 1e-2
    # summing bf16 values now also accumulates in float32
    torch.testing.assert_close(segment_sum(w16, bag_index, n), torch.ones(n), rtol=0, atol=2e-2)
    exact = torch.zeros(n, dtype=torch.float64).index_add(0, bag_index, w16.double())
    torch.testing.assert_close(segment_sum(w16, bag_index, n).double(), exact, rtol=1e-6, atol=1e-6)


def test_bf16_mean_matches_float64():
    bag_index, n = _bags()
    x = (torch.rand(bag_index.numel(), 4, generator=torch.Generator().manual_seed(1)) + 1).to(torch.bfloat16)
    mean = segment_mean(x, bag_index, n)
    assert mean.dtype == torch.float32
    ref = torch.stack([x[bag_index == b].double().mean(0) for b in range(n)])
    torch.testing.assert_close(mean.double(), ref, rtol=1e-6, atol=1e-6)


def test_smile_under_bf16_autocast_attention_sums_to_one():
    torch.manual_seed(0)
    model = SMILE(in_dim=32, embed_dim=16, attention_dim=8).eval()
    bag_index, n = _bags()
    x = torch.randn(bag_index.numel(), 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_packed(x, bag_index, n)
    assert out["attention"].dtype == torch.float32
    torch.testing.assert_close(segment_sum(out["attention"], bag_index, n), torch.ones(n), rtol=0, atol=1e-5)
    assert torch.isfinite(out["logits"]).all()


def test_float32_and_float64_unchanged():
    bag_index, n = _bags((5, 3))
    x = torch.randn(8, dtype=torch.float64)
    assert segment_sum(x, bag_index, n).dtype == torch.float64
    assert segment_softmax(x.float(), bag_index, n).dtype == torch.float32
    scripted = torch.jit.script(segment_softmax)  # still TorchScript-compatible
    torch.testing.assert_close(scripted(x.float(), bag_index, n), segment_softmax(x.float(), bag_index, n))
