"""The calling convention every MIL network of this bundle follows.

``forward(x, bag_index=None, n_bags=None)`` accepts
  * one bag ``(N, D)`` -> that bag's logit, shape ``(1,)``;
  * a padded-free batch of equal-size bags ``(B, N, D)`` -> ``(B,)`` logits;
  * packed bags ``(M, D)`` with ``bag_index`` ``(M,)`` (values 0..n_bags-1) -> ``(n_bags,)`` logits.

Networks return one logit per bag (STAS present) for use with ``BCEWithLogitsLoss``.
Subclasses implement :meth:`forward_packed`; networks with an auxiliary training loss (CLAM's
instance clustering, DTFD's tier-1 loss, ...) override :meth:`training_loss_terms`. Networks with an
attention score per instance return it from :meth:`attention` (used for heat maps).
"""

from __future__ import annotations

import torch
from torch import nn


class MILNetwork(nn.Module):
    """Base class: normalises the input forms to the packed form."""

    def forward(self, x: torch.Tensor, bag_index: torch.Tensor | None = None, n_bags: int | None = None) -> torch.Tensor:
        x, bag_index, n_bags = as_packed(x, bag_index, n_bags)
        return self.forward_packed(x, bag_index, n_bags)["logits"]

    def forward_packed(self, x: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> dict[str, torch.Tensor]:
        """Return a dict with at least ``logits`` (n_bags,); ``attention`` (M,) where defined."""
        raise NotImplementedError

    def attention(self, x: torch.Tensor, bag_index: torch.Tensor | None = None, n_bags: int | None = None) -> torch.Tensor:
        """Per-instance attention (M,), normalised within each bag; NaN-free."""
        x, bag_index, n_bags = as_packed(x, bag_index, n_bags)
        out = self.forward_packed(x, bag_index, n_bags)
        if "attention" not in out:
            raise NotImplementedError(f"{type(self).__name__} has no per-instance attention")
        return out["attention"]

    def training_loss_terms(
        self, out: dict[str, torch.Tensor], x: torch.Tensor, bag_index: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Extra loss terms (already weighted) added to the bag BCE during training. Default: none."""
        return {}


def as_packed(x: torch.Tensor, bag_index: torch.Tensor | None, n_bags: int | None):
    """Turn any accepted input form into (instances (M, D), bag_index (M,), n_bags)."""
    if bag_index is not None:
        if x.dim() != 2:
            raise ValueError(f"packed bags must be (M, D); got shape {tuple(x.shape)}")
        if n_bags is None:
            n_bags = int(bag_index.max()) + 1 if bag_index.numel() else 0
        return x, bag_index, int(n_bags)
    if x.dim() == 2:
        return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 1
    if x.dim() == 3:
        b, n, d = x.shape
        index = torch.arange(b, device=x.device).repeat_interleave(n)
        return x.reshape(b * n, d), index, b
    raise ValueError(f"expected a bag (N, D), bags (B, N, D) or packed (M, D) with bag_index; got {tuple(x.shape)}")
