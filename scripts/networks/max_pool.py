"""Max-pooling MIL baseline ("max_pool").

Embedding-level max pooling (MI-Net, Wang et al. 2018): Linear(in_dim, hidden) -> ReLU -> Dropout per
instance, element-wise max over the bag's instances, Linear(hidden, 1). Packed bags, no loop
(segment_max). Exactly permutation invariant. No attention is defined.
"""

from __future__ import annotations

from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.blocks import check_in_dim
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_ops import segment_max


@register_mil_network("max_pool")
class MaxPoolMIL(MILNetwork):
    def __init__(self, in_dim: int = 768, hidden_dim: int = 256, dropout: float = 0.25):
        super().__init__()
        self.in_dim = in_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, 1)

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        bag = segment_max(self.embed(x), bag_index, n_bags)
        return {"logits": self.classifier(bag).squeeze(-1), "bag_embedding": bag}
