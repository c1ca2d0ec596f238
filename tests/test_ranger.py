"""Ranger 20.4.11 (scripts/optim/ranger.py) against an independent, element-by-element transcription."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from scripts.engines.mil import create_optimizer
from scripts.optim import Ranger

LR, WD, B1, B2, EPS, K, ALPHA = 0.05, 0.1, 0.95, 0.999, 1e-5, 6, 0.5


class ReferenceRanger:
    """The published update rule, one scalar at a time in float64 Python (no torch, no vector ops)."""

    def __init__(self, params):
        self.p = [np.array(x, dtype=np.float64) for x in params]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.slow = [x.copy() for x in self.p]
        self.t = 0
        self.rectified = []

    def step(self, grads):
        self.t += 1
        t = self.t
        rho_inf = 2.0 / (1.0 - B2) - 1.0
        rho = rho_inf - 2.0 * t * B2**t / (1.0 - B2**t)
        self.rectified.append(rho > 5)
        for i, g in enumerate(grads):
            g = np.array(g, dtype=np.float64)
            if g.ndim > 1:  # centralise: one mean per output unit (first index) over everything else
                for row in range(g.shape[0]):
                    total, count = 0.0, 0
                    for idx in np.ndindex(g.shape[1:]):
                        total += g[(row,) + idx]
                        count += 1
                    for idx in np.ndindex(g.shape[1:]):
                        g[(row,) + idx] -= total / count
            p, m, v = self.p[i], self.m[i], self.v[i]
            for idx in np.ndindex(p.shape):
                m[idx] = B1 * m[idx] + (1 - B1) * g[idx]
                v[idx] = B2 * v[idx] + (1 - B2) * g[idx] * g[idx]
                w = p[idx] - WD * LR * p[idx]
                if rho > 5:
                    r = math.sqrt((1 - B2**t) * (rho - 4) / (rho_inf - 4) * (rho - 2) / rho * rho_inf / (rho_inf - 2))
                    w -= LR * r / (1 - B1**t) * m[idx] / (math.sqrt(v[idx]) + EPS)
                else:
                    w -= LR / (1 - B1**t) * m[idx]
                p[idx] = w
            if t % K == 0:
                for idx in np.ndindex(p.shape):
                    self.slow[i][idx] += ALPHA * (p[idx] - self.slow[i][idx])
                    p[idx] = self.slow[i][idx]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(9, 4), nn.Tanh(), nn.Linear(4, 1))


def _grads(net, step):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(5, 2, 4, generator=gen), torch.randn(5, 1, generator=gen)
    net.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    return [p.grad.detach().double().numpy().copy() for p in net.parameters()]


def test_ranger_matches_the_update_rule_step_by_step():
    net = _net()
    ref = ReferenceRanger([p.detach().double().numpy() for p in net.parameters()])
    opt = create_optimizer(net, "ranger", lr=LR, weight_decay=WD)
    assert isinstance(opt, Ranger)
    start = [p.detach().clone() for p in net.parameters()]
    for step in range(1, 14):
        grads = _grads(net, step)  # both take the gradient torch computed at torch's weights
        opt.step()
        ref.step(grads)
        for p, q in zip(net.parameters(), ref.p):
            np.testing.assert_allclose(p.detach().double().numpy(), q, rtol=2e-5, atol=2e-6, err_msg=f"step {step}")
        if step == K:  # the sync at step 6 put the weights on the slow path: half-way from the start
            for p, s0, q in zip(net.parameters(), start, ref.slow):
                np.testing.assert_allclose(p.detach().double().numpy(), q, rtol=2e-5, atol=2e-6)
                assert not torch.allclose(p.detach(), s0)
    # both branches of the rectification were exercised (the threshold is crossed within the run)
    assert not ref.rectified[0] and ref.rectified[-1]


def test_decay_is_decoupled_and_sync_at_step_six_from_the_outside():
    """A parameter whose gradient is always zero only decays (bias included), then syncs at step k."""
    bias = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Ranger([bias], lr=LR, weight_decay=WD)
    p0 = bias.detach().clone()
    for step in range(1, K + 1):
        bias.grad = torch.zeros_like(bias)
        opt.step()
        fast = p0 * (1 - WD * LR) ** step
        if step < K:
            torch.testing.assert_close(bias.detach(), fast)
    torch.testing.assert_close(bias.detach(), p0 + ALPHA * (fast - p0))


def test_gradient_centralisation_only_on_multi_dim_tensors():
    """With a row-constant gradient the centralised moment is zero: a 2-D weight does not move (wd 0)."""
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3))
    opt = Ranger([w, b], lr=LR, weight_decay=0.0)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad = torch.arange(3.0).unsqueeze(1).expand(3, 4).clone() + 1
    b.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(w.detach(), w0)
    assert (b.detach() < b0).all()


def test_timm_lookahead_radam_is_still_available_and_differs():
    net = _net()
    other = _net()
    ranger = create_optimizer(net, "ranger", lr=LR, weight_decay=WD)
    timm_opt = create_optimizer(other, "lookahead_radam", lr=LR, weight_decay=WD)
    assert not isinstance(timm_opt, Ranger)
    for step in range(1, 8):
        _grads(net, step)
        _grads(other, step)
        ranger.step()
        timm_opt.step()
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(net.parameters(), other.parameters()))
    assert diff > 1e-4  # the reference test above would fail on timm's optimiser


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Ranger([nn.Parameter(torch.zeros(1))], lr=0.0)
    with pytest.raises(ValueError):
        Ranger([nn.Parameter(torch.zeros(1))], k=0)
