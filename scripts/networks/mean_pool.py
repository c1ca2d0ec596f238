"""Mean-pooling MIL baseline ("mean_pool").

Embedding-level pooling (the MI-Net family, Wang et al. 2018): each instance is embedded by
Linear(in_dim, hidden) -> ReLU -> Dropout, the bag embedding is the mean of its instances, and
Linear(hidden, 1) gives the bag logit. Packed bags, no loop (segment_mean). Exactly permutation invariant.
No attention is defined (every instance weighs 1/N).
"""

from __future__ import annotations

from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.blocks import check_in_dim
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_ops import segment_mean


@register_mil_network("mean_pool")
class MeanPoolMIL(MILNetwork):
    def __init__(self, in_dim: int = 768, hidden_dim: int = 256, dropout: float = 0.25):
        super().__init__()
        self.in_dim = in_dim
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, 1)

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        bag = segment_mean(self.embed(x), bag_index, n_bags)
        return {"logits": self.classifier(bag).squeeze(-1), "bag_embedding": bag}
