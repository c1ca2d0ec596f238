"""ACMIL, attention-challenging MIL (Zhang et al., ECCV 2024; arXiv 2311.07125, 2023): "acmil".

Gated-attention variant (repository ``ACMIL_GA``): instances reduced by Linear(in_dim, hidden,
bias=False) -> ReLU (repository ``DimReduction``); a gated attention MLP (Linear(hidden,128) tanh / sigmoid
-> Linear(128, K)) gives K attention branches (multiple branch attention, MBA; K = 5, paper sec. 4 /
README command). Each branch pools the bag with its own softmax attention and has its own classifier
Linear(hidden, 1); the bag prediction comes from a slide classifier Linear(hidden, 1) applied to the bag
pooled with the mean of the K branch attention maps.

Stochastic top-K instance masking (STKIM), training mode only: in every branch, the top
``n_masked = 10`` instances by attention logit are found and a random ``floor(10 * 0.6)`` of them have
their logit set to -1e9 before the softmax (``min(10, n)`` for small bags, as in the repository).

Losses (repository training script): slide CE + mean branch CE + diversity loss, all with weight 1. The
diversity loss is the mean pairwise cosine similarity between the K branch attention maps (softmax
weights) of a bag. Here the slide loss is the base BCE and ``training_loss_terms`` returns the branch and
diversity terms. One output logit (BCE) instead of the repository's 2-class CE for every head.

Hidden size: the repository ties it to the feature size (384-d -> 128, 512-d -> 256, 768-d -> 384);
``hidden_dim=None`` uses ``in_dim // 2`` (384 for CTransPath). Packed bags, no loop over bags (the masking
ranks all bag x branch segments at once). Exactly permutation invariant in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.blocks import AttentionScorer, check_in_dim
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_ops import segment_softmax, segment_sum
from scripts.networks.segment_rank import segment_rank, segment_sizes

MASK_VALUE = -1e9


@register_mil_network("acmil")
class ACMIL(MILNetwork):
    def __init__(
        self,
        in_dim: int = 768,
        hidden_dim: int | None = None,
        attention_dim: int = 128,
        n_branches: int = 5,
        n_masked: int = 10,
        mask_drop: float = 0.6,
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden_dim = int(hidden_dim or max(in_dim // 2, 1))
        self.in_dim, self.n_branches = in_dim, int(n_branches)
        self.n_masked, self.mask_drop = int(n_masked), float(mask_drop)
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU())
        self.attention_net = AttentionScorer(hidden_dim, attention_dim, branches=self.n_branches, gated=True)
        self.branch_classifiers = nn.ModuleList(
            [nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, 1)) for _ in range(self.n_branches)]
        )
        self.slide_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, 1))

    def _stochastic_topk_mask(self, scores, bag_index, n_bags):
        """Boolean (M, K): instances masked in each branch (top-k by logit, a random share of them)."""
        m, k = scores.shape
        segment = (torch.arange(k, device=scores.device).unsqueeze(0) * n_bags + bag_index.unsqueeze(1)).T.reshape(-1)
        flat = scores.T.reshape(-1)
        n_seg = k * n_bags
        sizes = segment_sizes(segment, n_seg)
        top_k = torch.clamp(sizes, max=self.n_masked)
        n_drop = torch.floor(top_k.to(torch.float64) * self.mask_drop).long()
        top = segment_rank(flat, segment, n_seg, descending=True) < top_k[segment]
        # among the top set, a uniformly random subset of size n_drop: rank random keys, top set first
        keys = torch.rand(flat.shape[0], device=scores.device) + (~top).to(torch.float32) * 2.0
        chosen = top & (segment_rank(keys, segment, n_seg) < n_drop[segment])
        return chosen.view(k, m).T

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        h = self.reduce(x)
        scores = self.attention_net(h)
        if scores.dim() == 1:
            scores = scores.unsqueeze(1)
        if self.training and self.n_masked > 0 and self.mask_drop > 0:
            scores = scores.masked_fill(self._stochastic_topk_mask(scores, bag_index, n_bags), MASK_VALUE)
        weights = segment_softmax(scores, bag_index, n_bags)  # (M, K)
        branch_logits = torch.stack(
            [
                clf(segment_sum(weights[:, j : j + 1] * h, bag_index, n_bags)).squeeze(-1)
                for j, clf in enumerate(self.branch_classifiers)
            ],
            1,
        )  # (n_bags, K)
        bag_weights = weights.mean(1)
        bag = segment_sum(bag_weights.unsqueeze(-1) * h, bag_index, n_bags)
        return {
            "logits": self.slide_classifier(bag).squeeze(-1),
            "attention": bag_weights,
            "branch_attention": weights,
            "branch_logits": branch_logits,
        }

    def training_loss_terms(self, out, x, bag_index, labels):
        branch_logits = out["branch_logits"]
        n_bags, k = branch_logits.shape
        target = labels.view(-1).to(branch_logits.dtype)
        terms = {"acmil_branch": F.binary_cross_entropy_with_logits(branch_logits, target.unsqueeze(1).expand(-1, k))}
        if k > 1:
            w = out["branch_attention"]
            norms = segment_sum(w * w, bag_index, n_bags).clamp_min(1e-12).sqrt()  # (n_bags, K)
            total, pairs = w.new_zeros(n_bags), 0
            for i in range(k):
                for j in range(i + 1, k):
                    dot = segment_sum(w[:, i] * w[:, j], bag_index, n_bags)
                    total = total + dot / (norms[:, i] * norms[:, j])
                    pairs += 1
            terms["acmil_diversity"] = (total / pairs).mean()
        return terms
