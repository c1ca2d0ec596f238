"""Small building blocks shared by the attention-MIL baselines (not networks themselves)."""

from __future__ import annotations

import torch
from torch import nn


class AttentionScorer(nn.Module):
    """Per-instance attention logits, plain (Ilse et al. 2018, eq. 8) or gated (eq. 9).

    plain:  w^T tanh(V h)
    gated:  w^T (tanh(V h) * sigmoid(U h))
    ``branches`` > 1 gives one logit column per branch (CLAM-MB, ACMIL): (M, branches).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 128, branches: int = 1, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.branches = branches
        self.tanh_branch = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = (
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        )
        self.score = nn.Linear(hidden_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.tanh_branch(h)
        if self.gate_branch is not None:
            a = a * self.gate_branch(h)
        out = self.score(a)
        return out.squeeze(-1) if self.branches == 1 else out


def check_in_dim(x: torch.Tensor, in_dim: int, name: str) -> None:
    if x.shape[-1] != in_dim:
        raise ValueError(
            f"{name} was built for {in_dim}-d instance features but got {x.shape[-1]}-d; "
            f"build it with in_dim={x.shape[-1]} (e.g. 166 for MUSK, 768 for CTransPath)"
        )
