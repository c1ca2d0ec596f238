"""DTFD-MIL, double-tier feature distillation (Zhang et al., CVPR 2022): "dtfd".

Each bag's instances are split at random into G pseudo-bags (repository default ``numGroup`` 4; bags with
fewer than G instances get one pseudo-bag per instance). Instances are reduced by Linear(in_dim, 512,
bias=False) -> ReLU (repository ``DimReduction``, no residual blocks).

* Tier 1: gated attention (Linear(512,128) tanh / sigmoid -> Linear(128,1)) softmax-normalised within each
  pseudo-bag; the pooled pseudo-bag feature goes to Linear(512, 1); every pseudo-bag inherits its bag's
  label (tier-1 loss, returned by ``training_loss_terms`` with weight 1: the repository back-propagates
  the tier-1 and tier-2 losses into the tier-1 parameters with equal weight and one learning rate).
* Distillation: AFS (aggregated feature selection, the repository default ``distill_type``): the
  distilled feature of a pseudo-bag is its tier-1 attention-pooled feature.
* Tier 2: gated attention over a bag's distilled features (same sizes, softmax over its pseudo-bags) ->
  Linear(512, 1) gives the bag logit.

One output logit instead of the repository's 2-class softmax (tier-1 and tier-2 heads are Linear(512, 1)).

Packed: pseudo-bags are themselves packed segments (id = bag offset + group), so there is no loop over
bags or pseudo-bags. ``attention`` per instance = tier-1 weight within its pseudo-bag x tier-2 weight of
that pseudo-bag (sums to 1 per bag; the paper derives instance probabilities with Grad-CAM instead).

Deviation: the repository also splits at random at test time (so a prediction changes from run to run).
Here the split is random in training mode only; in eval mode instances are ranked by a fixed random
projection of their features and dealt round-robin into the pseudo-bags, which makes eval predictions
deterministic and exactly permutation invariant while keeping pseudo-bags of mixed content.
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


@register_mil_network("dtfd")
class DTFDMIL(MILNetwork):
    def __init__(self, in_dim: int = 768, embed_dim: int = 512, attention_dim: int = 128, n_groups: int = 4, dropout: float = 0.0):
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1; got {n_groups}")
        self.in_dim, self.n_groups = in_dim, int(n_groups)
        self.reduce = nn.Sequential(nn.Linear(in_dim, embed_dim, bias=False), nn.ReLU())
        self.tier1_attention = AttentionScorer(embed_dim, attention_dim, gated=True)
        self.tier1_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, 1))
        self.tier2_attention = AttentionScorer(embed_dim, attention_dim, gated=True)
        self.tier2_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, 1))
        generator = torch.Generator().manual_seed(20220607)
        self.register_buffer("split_projection", torch.randn(in_dim, generator=generator), persistent=False)

    def pseudo_bags(self, x, bag_index, n_bags):
        """(pseudo-bag id per instance (M,), bag of each pseudo-bag (P,), P)."""
        sizes = segment_sizes(bag_index, n_bags)
        groups = torch.clamp(sizes, max=self.n_groups)
        if self.training:
            keys = torch.rand(x.shape[0], device=x.device)
        else:
            keys = x.detach() @ self.split_projection.to(x.dtype)
        rank = segment_rank(keys, bag_index, n_bags)
        first = torch.cumsum(groups, 0) - groups
        pseudo = first[bag_index] + rank % groups[bag_index]
        n_pseudo = int(groups.sum())
        pseudo_bag = torch.repeat_interleave(torch.arange(n_bags, device=x.device), groups)
        return pseudo, pseudo_bag, n_pseudo

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        pseudo, pseudo_bag, n_pseudo = self.pseudo_bags(x, bag_index, n_bags)
        h = self.reduce(x)
        w1 = segment_softmax(self.tier1_attention(h), pseudo, n_pseudo)
        pseudo_feat = segment_sum(w1.unsqueeze(-1) * h, pseudo, n_pseudo)  # AFS distilled features
        tier1_logits = self.tier1_classifier(pseudo_feat).squeeze(-1)
        w2 = segment_softmax(self.tier2_attention(pseudo_feat), pseudo_bag, n_bags)
        bag = segment_sum(w2.unsqueeze(-1) * pseudo_feat, pseudo_bag, n_bags)
        return {
            "logits": self.tier2_classifier(bag).squeeze(-1),
            "attention": w1 * w2[pseudo],
            "tier1_logits": tier1_logits,
            "pseudo_bag_of": pseudo_bag,
        }

    def training_loss_terms(self, out, x, bag_index, labels):
        target = labels.view(-1).to(out["tier1_logits"].dtype)[out["pseudo_bag_of"]]
        return {"dtfd_tier1": F.binary_cross_entropy_with_logits(out["tier1_logits"], target)}
