"""CLAM (Lu et al., Nature Biomedical Engineering 2021): "clam_sb" (single branch) and "clam_mb" (multi branch).

Architecture (official repository, size "small", gated attention): Linear(in_dim, 512) -> ReLU ->
Dropout(0.25); gated attention Linear(512, 256) tanh / sigmoid (dropout 0.25) -> Linear(256, branches);
softmax within each bag.

* CLAM-SB: one attention branch, bag classifier Linear(512, 1).
* CLAM-MB: one attention branch per class (2 for the binary task) and one Linear(512, 1) bag classifier
  per class on that class's attention-pooled embedding, as in the paper.

One output logit: the paper's 2-class softmax is replaced by one logit. For CLAM-SB the head is
Linear(512, 1) directly; for CLAM-MB the logit is ``score_positive - score_negative``, which is exactly
the log-odds of the paper's 2-class softmax over the per-class scores.

Instance-level clustering (the paper's "smooth SVM or CE" auxiliary loss; the repository's default is
cross-entropy, used here): for each bag, the k most attended instances are pseudo-labelled positive and
the k least attended negative for the instance classifier of the bag's true class (in-class evaluation;
for a binary, non-subtyping task the repository does no out-of-class evaluation). For CLAM-MB the
ranking uses the attention branch of the bag's true class. Instance classifiers are Linear(512, 2), one
per class. The repository's loss is ``0.7 * bag + 0.3 * instance``; here the bag BCE has weight 1, so the
instance term is returned weighted by 0.3 / 0.7 (same ratio). k = 8 (repository ``B``), clipped per bag
to ``floor(n / 2)`` so the top and bottom sets never overlap (the repository fails on bags with fewer
than k instances); bags of one instance contribute no instance loss.

Packed bags, no loop (ranks via two stable sorts). Exactly permutation invariant.
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


class _CLAM(MILNetwork):
    n_branches = 1

    def __init__(
        self,
        in_dim: int = 768,
        embed_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
    ):
        super().__init__()
        if not 0.0 < bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in (0, 1]; got {bag_weight}")
        self.in_dim = in_dim
        self.k_sample = int(k_sample)
        self.instance_weight = (1.0 - bag_weight) / bag_weight
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_net = AttentionScorer(embed_dim, attention_dim, branches=self.n_branches, gated=True, dropout=dropout)
        self.instance_classifiers = nn.ModuleList([nn.Linear(embed_dim, 2) for _ in range(2)])

    def _instance_loss(self, h, branch_scores, bag_index, n_bags, labels):
        """CE of the true class's instance classifier on top-k (target 1) / bottom-k (target 0) instances."""
        labels = labels.view(-1).long()
        if labels.shape[0] != n_bags:
            raise ValueError(f"CLAM instance loss needs one label per bag: {labels.shape[0]} labels for {n_bags} bags")
        sizes = segment_sizes(bag_index, n_bags)
        k = torch.clamp(sizes // 2, max=self.k_sample)
        rank = segment_rank(branch_scores, bag_index, n_bags, descending=True)
        k_i, n_i = k[bag_index], sizes[bag_index]
        top = rank < k_i
        bottom = rank >= n_i - k_i
        chosen = top | bottom
        if not bool(chosen.any()):
            return h.new_zeros(())
        h_sel = h[chosen]
        cls_sel = labels[bag_index[chosen]]
        target = top[chosen].long()
        logits_all = torch.stack([clf(h_sel) for clf in self.instance_classifiers], 1)  # (S, classes, 2)
        logits = logits_all[torch.arange(h_sel.shape[0], device=h.device), cls_sel]
        ce = F.cross_entropy(logits, target, reduction="none")
        bag_sel = bag_index[chosen]
        per_bag = segment_sum(ce, bag_sel, n_bags) / (2 * k).clamp_min(1).to(ce.dtype)
        valid = k > 0
        return per_bag[valid].mean()


@register_mil_network("clam_sb")
class CLAMSB(_CLAM):
    n_branches = 1

    def __init__(self, in_dim: int = 768, embed_dim: int = 512, **kwargs):
        super().__init__(in_dim=in_dim, embed_dim=embed_dim, **kwargs)
        self.classifier = nn.Linear(embed_dim, 1)

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        h = self.embed(x)
        scores = self.attention_net(h)
        weights = segment_softmax(scores, bag_index, n_bags)
        bag = segment_sum(weights.unsqueeze(-1) * h, bag_index, n_bags)
        return {"logits": self.classifier(bag).squeeze(-1), "attention": weights, "attention_logits": scores, "instance_embedding": h}

    def training_loss_terms(self, out, x, bag_index, labels):
        n_bags = out["logits"].shape[0]
        loss = self._instance_loss(out["instance_embedding"], out["attention_logits"], bag_index, n_bags, labels)
        return {"clam_instance": self.instance_weight * loss}


@register_mil_network("clam_mb")
class CLAMMB(_CLAM):
    n_branches = 2

    def __init__(self, in_dim: int = 768, embed_dim: int = 512, **kwargs):
        super().__init__(in_dim=in_dim, embed_dim=embed_dim, **kwargs)
        self.classifiers = nn.ModuleList([nn.Linear(embed_dim, 1) for _ in range(2)])

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        h = self.embed(x)
        scores = self.attention_net(h)  # (M, 2): branch 0 = negative class, 1 = positive class
        weights = segment_softmax(scores, bag_index, n_bags)
        class_scores = torch.cat(
            [self.classifiers[c](segment_sum(weights[:, c : c + 1] * h, bag_index, n_bags)) for c in range(2)], 1
        )
        logits = class_scores[:, 1] - class_scores[:, 0]
        return {
            "logits": logits,
            "attention": weights[:, 1],
            "attention_all": weights,
            "attention_logits": scores,
            "instance_embedding": h,
        }

    def training_loss_terms(self, out, x, bag_index, labels):
        n_bags = out["logits"].shape[0]
        labels_long = labels.view(-1).long()
        branch_scores = out["attention_logits"].gather(1, labels_long[bag_index].unsqueeze(1)).squeeze(1)
        loss = self._instance_loss(out["instance_embedding"], branch_scores, bag_index, n_bags, labels)
        return {"clam_instance": self.instance_weight * loss}
