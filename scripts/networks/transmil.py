"""TransMIL (Shao et al., NeurIPS 2021): "transmil".

Architecture (paper sec. 3-4 and the official repository): Linear(in_dim, 512) -> ReLU; the bag's tokens
are padded to the next square number H*H by repeating its first tokens; a learnable class token is
prepended; TransLayer -> PPEG -> TransLayer -> LayerNorm; Linear(512, 1) on the class token.

* TransLayer: ``x + NystromAttention(LayerNorm(x))`` with 8 heads of 64 dims, 256 landmarks (dim / 2),
  6 Moore-Penrose iterations, a depthwise residual convolution of kernel 33 over the values, and dropout
  0.1 (the repository's arguments to the ``nystrom-attention`` package, re-implemented here).
* PPEG: the H x H token grid plus depthwise 7x7, 5x5 and 3x3 convolutions (class token untouched).

Attention: Nystrom, implemented in this file. When a sequence has no more tokens than landmarks the
Nystrom approximation with one landmark per token is the exact softmax attention, so exact attention is
used (MUSK-sized and small bags). Deviation from the ``nystrom-attention`` package: for longer sequences
the landmarks are the means of 256 near-equal contiguous segments of the real tokens, instead of
segments of a sequence front-padded with zero tokens that then also take part in the attention.

One output logit instead of the paper's 2-class softmax. No per-instance attention is returned (the
method does not define one).

Per-bag structure: the square grid and the self-attention are per bag. Bags are batched by grid side H
(one batched pass per distinct H, padding within a bag only), so the loop runs over distinct grid sizes,
not over bags. TransMIL is NOT permutation invariant: the PPEG convolutions see the token order and the
square padding repeats the first tokens; eval predictions are deterministic and independent of the
other bags in a batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.blocks import check_in_dim
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_rank import segment_sizes


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of row-stochastic matrices by the Newton-Schulz style
    iteration used by Nystromformer (Xiong et al. 2021, eq. 15)."""
    abs_a = a.abs()
    scale = abs_a.sum(-1).amax(-1, keepdim=True).unsqueeze(-1) * abs_a.sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-1, -2) / scale
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # (B, h, n, d) each
        q = q * self.scale
        m = self.num_landmarks
        if n <= m:
            out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        else:
            group = (torch.arange(n, device=x.device) * m) // n  # m near-equal contiguous segments
            counts = torch.bincount(group, minlength=m).to(x.dtype).view(1, 1, m, 1)
            q_l = q.new_zeros(b, self.heads, m, self.dim_head).index_add(2, group, q) / counts
            k_l = k.new_zeros(b, self.heads, m, self.dim_head).index_add(2, group, k) / counts
            a1 = torch.softmax(q @ k_l.transpose(-1, -2), -1)
            a2 = torch.softmax(q_l @ k_l.transpose(-1, -2), -1)
            a3 = torch.softmax(q_l @ k.transpose(-1, -2), -1)
            out = (a1 @ iterative_pinv(a2, self.pinv_iterations)) @ (a3 @ v)
        out = out + self.residual(v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class TransLayer(nn.Module):
    def __init__(self, dim: int = 512, **attention_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim=dim, **attention_kwargs)

    def forward(self, x):
        return x + self.attention(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: grid + depthwise 7x7 + 5x5 + 3x3 convolutions."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3)])

    def forward(self, x, side: int):
        b, _, c = x.shape
        cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)


@register_mil_network("transmil")
class TransMIL(MILNetwork):
    def __init__(self, in_dim: int = 768, dim: int = 512, heads: int = 8, num_landmarks: int | None = None,
                 pinv_iterations: int = 6, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.in_dim = in_dim
        attn = dict(heads=heads, dim_head=dim // heads, num_landmarks=num_landmarks or dim // 2,
                    pinv_iterations=pinv_iterations, dropout=dropout)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, **attn)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, **attn)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, 1)

    def forward_packed(self, x, bag_index, n_bags):
        check_in_dim(x, self.in_dim, type(self).__name__)
        h = self.fc1(x)
        sizes = segment_sizes(bag_index, n_bags)
        if n_bags and int(sizes.min()) == 0:
            raise ValueError("TransMIL got an empty bag (0 instances); every bag needs at least one patch")
        order = torch.sort(bag_index, stable=True).indices  # instances grouped by bag, packed order kept
        starts = torch.cumsum(sizes, 0) - sizes
        sides = torch.tensor([math.isqrt(int(n) - 1) + 1 for n in sizes.tolist()], device=x.device)
        bag_ids, cls_out = [], []
        for side in torch.unique(sides).tolist():
            bags = torch.nonzero(sides == side, as_tuple=True)[0]
            j = torch.arange(side * side, device=x.device)
            # token j of bag b: its instance j, or (square padding) instance j - n_b, i.e. j mod n_b
            idx = order[starts[bags].unsqueeze(1) + j.unsqueeze(0) % sizes[bags].unsqueeze(1)]
            tokens = torch.cat([self.cls_token.expand(bags.numel(), -1, -1), h[idx]], 1)
            tokens = self.layer2(self.ppeg(self.layer1(tokens), side))
            cls_out.append(self.norm(tokens[:, 0]))
            bag_ids.append(bags)
        bag_ids, cls_out = torch.cat(bag_ids), torch.cat(cls_out)
        logits = self.fc2(cls_out).squeeze(-1)
        return {"logits": logits.new_zeros(n_bags).index_copy(0, bag_ids, logits)}
