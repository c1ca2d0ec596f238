"""DSMIL, dual-stream MIL (Li, Li & Eliceiri, CVPR 2021): "dsmil".

Stream 1 (instance classifier): Linear(in_dim, 1) gives an instance score c_i; the bag's max score is
its "critical instance" m. Stream 2 (bag classifier): queries q_i = Tanh(Linear(128,128)(ReLU(
Linear(in_dim,128)(x_i)))) (the repository's non-linear query), values v_i = x_i (repository default,
``passing_v=False``); attention a_i = softmax_i(<q_i, q_m> / sqrt(128)) within the bag (the
distance-based attention of eq. 4-5); the bag embedding b = sum a_i v_i goes through the repository's
Conv1d(1, 1, kernel_size=in_dim), i.e. an affine map to one logit.

Losses (paper sec. 3.2): bag loss on the bag stream plus the same loss on the critical instance's score
(the repository weights them 0.5 / 0.5; here the base BCE is on the bag logit and ``training_loss_terms``
adds the max-instance BCE with weight 1, the same 1:1 ratio). The repository's number of classes for a
binary task is 1 (BCE), so no adaptation is needed. ``logits`` is the bag stream; ``max_instance_logits``
carries stream 1, and ``predict="average"`` returns the logit of the mean of both probabilities instead
(the repository's test-time score in some versions).

Packed bags, no loop: the critical instance per bag is found by a segment arg-max. Exactly permutation
invariant (ties in the max score are broken by packed order, which only matters for exact duplicates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.blocks import check_in_dim
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_ops import segment_softmax, segment_sum
from scripts.networks.segment_rank import segment_argmax


@register_mil_network("dsmil")
class DSMIL(MILNetwork):
    def __init__(self, in_dim: int = 768, query_dim: int = 128, dropout_v: float = 0.0, passing_v: bool = False, predict: str = "bag"):
        super().__init__()
        if predict not in ("bag", "average"):
            raise ValueError(f"predict must be 'bag' or 'average'; got {predict!r}")
        self.in_dim, self.predict = in_dim, predict
        self.instance_classifier = nn.Linear(in_dim, 1)
        self.query = nn.Sequential(nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        self.value = (
            nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU()) if passing_v else nn.Identity()
        )
        self.bag_classifier = nn.Conv1d(1, 1, kernel_size=in_dim)
        self.scale = 1.0 / math.sqrt(query_dim)

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        instance_logits = self.instance_classifier(x).squeeze(-1)
        critical = segment_argmax(instance_logits, bag_index, n_bags)  # (n_bags,)
        q = self.query(x)
        q_critical = q[critical]  # (n_bags, Dq)
        scores = (q * q_critical[bag_index]).sum(-1) * self.scale
        weights = segment_softmax(scores, bag_index, n_bags)
        bag = segment_sum(weights.unsqueeze(-1) * self.value(x), bag_index, n_bags)
        bag_logits = self.bag_classifier(bag.unsqueeze(1)).view(-1)
        max_logits = instance_logits[critical]
        if self.predict == "average":
            p = 0.5 * (torch.sigmoid(bag_logits) + torch.sigmoid(max_logits))
            logits = torch.logit(p.clamp(1e-7, 1 - 1e-7))
        else:
            logits = bag_logits
        return {
            "logits": logits,
            "bag_logits": bag_logits,
            "max_instance_logits": max_logits,
            "instance_logits": instance_logits,
            "attention": weights,
        }

    def training_loss_terms(self, out, x, bag_index, labels):
        target = labels.view(-1).to(out["max_instance_logits"].dtype)
        return {"dsmil_max_instance": F.binary_cross_entropy_with_logits(out["max_instance_logits"], target)}
