"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018): "abmil" (plain) and "abmil_gated".

Instances are embedded by Linear(in_dim, 500) -> ReLU (L = 500, the official repository's embedding
size), scored by the attention MLP of eq. 8 (plain: w^T tanh(V h)) or eq. 9 (gated:
w^T (tanh(V h) * sigmoid(U h))) with D = 128, softmax-normalised within each bag, and the weighted sum
goes to Linear(500, 1) (the paper's own head is a single sigmoid output, so no adaptation is needed).
Packed bags, no loop; exactly permutation invariant.
"""

from __future__ import annotations

from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.blocks import AttentionScorer, check_in_dim
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_ops import segment_softmax, segment_sum


class _ABMIL(MILNetwork):
    gated = False

    def __init__(self, in_dim: int = 768, embed_dim: int = 500, attention_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_net = AttentionScorer(embed_dim, attention_dim, gated=self.gated)
        self.classifier = nn.Linear(embed_dim, 1)

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        h = self.embed(x)
        scores = self.attention_net(h)
        weights = segment_softmax(scores, bag_index, n_bags)
        bag = segment_sum(weights.unsqueeze(-1) * h, bag_index, n_bags)
        return {"logits": self.classifier(bag).squeeze(-1), "attention": weights, "attention_logits": scores}


@register_mil_network("abmil")
class ABMIL(_ABMIL):
    """Plain attention pooling (Ilse et al. 2018, eq. 8)."""

    gated = False


@register_mil_network("abmil_gated")
class GatedABMIL(_ABMIL):
    """Gated attention pooling (Ilse et al. 2018, eq. 9)."""

    gated = True
