"""SMILE network: official compatibility, edge cases, packing, permutation and batch independence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.networks import build_mil_network
from scripts.networks.segment_ops import pack_bags
from scripts.networks.smile import SMILE, damp_top_logits


class OfficialLayout(nn.Module):
    """The official STAS_MIL written here from its documented structure (same module names, so the
    same state_dict keys), evaluating one bag the way the official code does (per-bag loop, min-max
    without epsilon, two-output head followed by a sigmoid)."""

    def __init__(self, in_dim=768, embed_dim=256, attention_dim=128, threshold=0.5, factor=0.5, margin=True):
        super().__init__()
        self.threshold, self.factor, self.margin = threshold, factor, margin
        self.fc = nn.Sequential(nn.BatchNorm1d(in_dim), nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.Attention = nn.Module()
        self.Attention.a_attention = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Sigmoid())
        self.Attention.b_attention = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Tanh())
        self.Attention.linear = nn.Sequential(nn.Linear(attention_dim, 1))
        self.classifier = nn.Sequential(nn.Linear(embed_dim, 2), nn.Sigmoid())

    def forward(self, x):  # one bag (N, D) -> probs (1, 2)
        h = self.fc(x)
        score = self.Attention.linear(self.Attention.a_attention(h) * self.Attention.b_attention(h))  # (N, 1)
        if self.margin:
            norm = (score - score.min()) / (score.max() - score.min())
            score = score * torch.where(norm > self.threshold, torch.tensor(self.factor), torch.tensor(1.0))
        weights = torch.softmax(score, dim=0)
        return self.classifier((weights * h).sum(0, keepdim=True))


def _randomise_batchnorm(bn: nn.BatchNorm1d, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("threshold,factor", [(0.5, 0.5), (0.5, 0.3), (0.8, 0.9)])
def test_official_state_dict_gives_official_probabilities(threshold, factor):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    official = OfficialLayout(threshold=threshold, factor=factor)
    _randomise_batchnorm(official.fc[0], gen)
    # scale the attention so the damping actually changes several logits
    with torch.no_grad():
        official.Attention.linear[0].weight.mul_(5.0)
    official.eval()
    ours = SMILE.from_official_state_dict(official.state_dict(), threshold=threshold, factor=factor).eval()
    n_damped = 0
    for n in (1, 2, 7, 300):
        x = torch.randn(n, 768, generator=gen) * 2 + 0.3
        with torch.no_grad():
            expected = official(x)[:, 1]
            got = torch.sigmoid(ours(x))
            raw = ours.forward_packed(x, torch.zeros(n, dtype=torch.long), 1)["attention_logits"]
        assert got.shape == (1,)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        n_damped += int((damp_top_logits(raw, torch.zeros(n, dtype=torch.long), 1, threshold, factor) != raw).sum())
    assert n_damped > 10  # the comparison exercised the damping, not only plain attention


def test_official_state_dict_rejects_other_layouts():
    with pytest.raises(KeyError, match="fc.0.weight"):
        SMILE.from_official_state_dict(SMILE().state_dict())


def test_factor_one_is_exactly_gated_abmil():
    torch.manual_seed(1)
    smile = SMILE(factor=1.0).eval()
    x = torch.randn(50, 768)
    with torch.no_grad():
        h = smile.embed(x)
        a = smile.attention_score(torch.sigmoid(smile.attention_gate(h)) * torch.tanh(smile.attention_value(h)))
        expected = smile.classifier((torch.softmax(a, 0) * h).sum(0))
        torch.testing.assert_close(smile(x), expected, atol=1e-6, rtol=1e-6)  # only summation order differs
        raw = smile.forward_packed(x, torch.zeros(50, dtype=torch.long), 1)["attention_logits"]
    assert torch.equal(damp_top_logits(raw, torch.zeros(50, dtype=torch.long), 1, 0.5, 1.0), raw)


def test_damping_rule_and_edge_cases():
    idx = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    logits = torch.tensor([0.0, 1.0, 3.0, 4.0, 5.0, 2.0, 2.0])
    out = damp_top_logits(logits, idx, 3, threshold=0.5, factor=0.5)
    # bag 0: normalised 0, .25, .75, 1 -> last two damped; bag 1 (one instance) and bag 2 (equal) untouched
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 1.5, 2.0, 5.0, 2.0, 2.0]))
    # strict '>' : exactly at the threshold is not damped
    out = damp_top_logits(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3, dtype=torch.long), 1, 0.5, 0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 1.0]))
    # documented: damping a negative logit raises it
    out = damp_top_logits(torch.tensor([-4.0, -1.0]), torch.zeros(2, dtype=torch.long), 1, 0.5, 0.5)
    torch.testing.assert_close(out, torch.tensor([-4.0, -0.5]))


def test_one_patch_and_constant_bags_are_finite():
    model = SMILE().eval()
    with torch.no_grad():
        for x in (torch.randn(1, 768), torch.ones(5, 768), torch.zeros(3, 768)):
            out = model.forward_packed(x, torch.zeros(x.shape[0], dtype=torch.long), 1)
            assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["attention"]).all()
            torch.testing.assert_close(out["attention"].sum(), torch.tensor(1.0))
    model.train()  # one-instance training batch: BatchNorm needs >1 value, so pack with another bag
    x, idx = pack_bags([torch.randn(1, 768), torch.randn(4, 768)])
    out = model.forward_packed(x, idx, 2)
    out["logits"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_permutation_and_batch_independence():
    torch.manual_seed(2)
    model = build_mil_network("smile", in_dim=32, embed_dim=16, attention_dim=8).eval()
    with torch.no_grad():
        model.attention_score.weight.mul_(10)  # make damping active
    bags = [torch.randn(n, 32) for n in (5, 1, 17, 9)]
    x, idx = pack_bags(bags)
    with torch.no_grad():
        batched = model(x, idx, 4)
        alone = torch.cat([model(b) for b in bags])
        torch.testing.assert_close(batched, alone, atol=1e-6, rtol=1e-5)
        perm = [b[torch.randperm(b.shape[0])] for b in bags]
        x2, idx2 = pack_bags(perm[::-1])
        torch.testing.assert_close(model(x2, idx2, 4).flip(0), batched, atol=1e-6, rtol=1e-5)
        # interleaved instances (bag index not sorted) give the same result
        order = torch.randperm(x.shape[0])
        torch.testing.assert_close(model(x[order], idx[order], 4), batched, atol=1e-6, rtol=1e-5)
        # (B, N, D) input form
        same = torch.randn(3, 6, 32)
        torch.testing.assert_close(model(same), torch.cat([model(b) for b in same]), atol=1e-6, rtol=1e-5)


def test_smile_ilse_embedding_option():
    """hidden_dims / input_norm / embed_dropout build Ilse et al.'s MUSK embedding; the default is unchanged."""
    from scripts.networks import build_mil_network

    default = build_mil_network("smile", in_dim=32)
    assert [type(m).__name__ for m in default.embed] == ["BatchNorm1d", "Linear", "ReLU"]
    model = build_mil_network("smile", in_dim=166, hidden_dims=[256, 128], embed_dim=64, attention_dim=64,
                              input_norm="none", embed_dropout=0.25)  # fmt: skip
    linears = [m for m in model.embed if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(166, 256), (256, 128), (128, 64)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.embed)
    assert sum(isinstance(m, nn.Dropout) for m in model.embed) == 3
    rebuilt = build_mil_network("smile", **model.config)
    rebuilt.load_state_dict(model.state_dict())  # config round-trips the architecture
    x = torch.randn(7, 166)
    assert model.eval()(x).shape == (1,)
    with pytest.raises(ValueError, match="input_norm"):
        build_mil_network("smile", in_dim=8, input_norm="layernorm")
