"""Adaptive SMILE ("smile_adaptive"): SMILE's attention damping with a learned, per-slide threshold and factor.

SMILE (Pan et al. 2025) min-max normalises each bag's attention logits to s in [0, 1] and multiplies the
logits with s > threshold by a fixed factor before the softmax (threshold 0.5, factor 0.3 in the
official training runs), so a few dominant patches cannot take all the attention. The paper leaves open
whether threshold and factor could be learned or adapted per slide. This variant makes both learnable
and slide-dependent, while starting exactly at SMILE's operating point:

1. Shared SMILE head (same layer sizes as SMILE): BatchNorm1d(in_dim) -> Linear(in_dim, 256) -> ReLU;
   gated attention a = tanh(Linear(256,128) h), b = sigmoid(Linear(256,128) h),
   logit = Linear(128,1)(a * b); per-bag min-max normalisation s = (l - min) / max(max - min, eps).
2. Soft gate instead of the hard ``s > threshold``: g = sigmoid((s - tau_b) / T) with a fixed temperature
   T = 0.05 (``temperature``). As T -> 0 this is SMILE's step; at 0.05 the gate goes from 0.12 to 0.88
   within +-0.1 of the threshold, so it stays close to SMILE yet gives the threshold a gradient.
3. Damped logit: l' = l * (1 - g + g * f_b), i.e. l where g = 0 and f_b * l where g = 1 (SMILE's rule).
4. Per-bag threshold and factor: tau_b = sigmoid(theta_tau + d_tau), f_b = f_max * sigmoid(theta_f + d_f)
   with global learnable theta's initialised to threshold 0.5 and factor 0.3, and (d_tau, d_f) =
   Linear(3, 2)(bag statistics) initialised to zero. The statistics describe the bag's attention profile
   and are detached (they condition the gate, they are not optimised through): mean and standard
   deviation of s, and log(number of instances). f_max = 2 lets the learned factor also amplify (> 1),
   which SMILE's fixed setting cannot express. ``per_bag=False`` keeps only the global learnable pair.
5. Segment softmax of l', weighted sum of h, Linear(256, 1) -> one logit.

Why this design: (a) at initialisation it reproduces SMILE (soft step at 0.5, factor 0.3), so any
departure is learned from data, not imposed; (b) the sigmoid gate is the smallest change that makes the
threshold differentiable; (c) slides differ in how peaked their attention is (a small lesion in a large
slide versus diffuse disease), which the mean / spread of the normalised scores and the bag size
summarise, so a per-slide threshold and factor can depend on exactly those; (d) the per-bag part is a
3x2 linear map (8 parameters) so it cannot overfit small cohorts much more than the global pair.

Packed bags, no loop; exactly permutation invariant. The gate is used in training and evaluation alike
(as SMILE's step is). ``attention`` is the final (damped) softmax weight per instance; ``threshold`` and
``factor`` (n_bags,) are returned for inspection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.blocks import check_in_dim
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_ops import segment_max, segment_mean, segment_min, segment_softmax, segment_sum


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@register_mil_network("smile_adaptive")
class AdaptiveSMILE(MILNetwork):
    def __init__(
        self,
        in_dim: int = 768,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        threshold: float = 0.5,
        factor: float = 0.3,
        factor_max: float = 2.0,
        temperature: float = 0.05,
        per_bag: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1); got {threshold}")
        if not 0.0 < factor < factor_max:
            raise ValueError(f"factor must be in (0, factor_max={factor_max}); got {factor}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.in_dim, self.factor_max, self.temperature, self.eps = in_dim, float(factor_max), float(temperature), float(eps)
        self.fc = nn.Sequential(nn.BatchNorm1d(in_dim), nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.attention_a = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid())
        self.attention_score = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, 1)
        self.threshold_raw = nn.Parameter(torch.tensor(_logit(threshold)))
        self.factor_raw = nn.Parameter(torch.tensor(_logit(factor / factor_max)))
        self.per_bag = bool(per_bag)
        if self.per_bag:
            self.adapt = nn.Linear(3, 2)
            nn.init.zeros_(self.adapt.weight)
            nn.init.zeros_(self.adapt.bias)

    def bag_statistics(self, s, bag_index, n_bags):
        """(n_bags, 3): mean and std of the normalised scores, log bag size; detached."""
        s = s.detach()
        mean = segment_mean(s, bag_index, n_bags)
        var = segment_mean((s - mean[bag_index]) ** 2, bag_index, n_bags)
        counts = torch.bincount(bag_index, minlength=n_bags).clamp_min(1).to(s.dtype)
        return torch.stack([mean, var.clamp_min(0).sqrt(), counts.log()], 1)

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        h = self.fc(x)
        logits_att = self.attention_score(self.attention_a(h) * self.attention_b(h)).squeeze(-1)
        lo = segment_min(logits_att, bag_index, n_bags)
        hi = segment_max(logits_att, bag_index, n_bags)
        s = (logits_att - lo[bag_index]) / (hi - lo).clamp_min(self.eps)[bag_index]
        raw = torch.stack([self.threshold_raw, self.factor_raw]).expand(n_bags, 2)
        if self.per_bag:
            raw = raw + self.adapt(self.bag_statistics(s, bag_index, n_bags))
        threshold = torch.sigmoid(raw[:, 0])
        factor = self.factor_max * torch.sigmoid(raw[:, 1])
        gate = torch.sigmoid((s - threshold[bag_index]) / self.temperature)
        damped = logits_att * (1.0 - gate + gate * factor[bag_index])
        weights = segment_softmax(damped, bag_index, n_bags)
        bag = segment_sum(weights.unsqueeze(-1) * h, bag_index, n_bags)
        return {
            "logits": self.classifier(bag).squeeze(-1),
            "attention": weights,
            "attention_logits": logits_att,
            "normalised_scores": s,
            "gate": gate,
            "threshold": threshold,
            "factor": factor,
        }
