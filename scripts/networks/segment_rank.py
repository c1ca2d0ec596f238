"""Rank-based operations within packed bags (top-k selection, arg-max), without a loop over bags.

These complement :mod:`scripts.networks.segment_ops` for the baselines that pick instances by rank
(CLAM's top-k / bottom-k instances, DSMIL's critical instance, ACMIL's top-k masking, DTFD's pseudo-bag
split). The trick is two stable sorts: first by the key, then by the segment id; instances of a segment
end up contiguous and in key order, and an instance's rank is its position minus the segment's start.
"""

from __future__ import annotations

import torch


def segment_rank(keys: torch.Tensor, segment: torch.Tensor, n_segments: int, descending: bool = False) -> torch.Tensor:
    """Rank (0-based) of each ``keys`` (M,) entry within its segment, ordered by key.

    Ties keep their packed order. Returns a long tensor (M,). No gradient flows (ranks are integers).
    """
    if keys.dim() != 1 or keys.shape != segment.shape:
        raise ValueError(f"segment_rank needs keys (M,) and segment (M,); got {tuple(keys.shape)} and {tuple(segment.shape)}")
    m = keys.shape[0]
    if m == 0:
        return segment.new_zeros(0)
    by_key = torch.sort(keys.detach(), descending=descending, stable=True).indices
    by_segment = torch.sort(segment[by_key], stable=True).indices
    order = by_key[by_segment]  # instances grouped by segment, in key order inside each segment
    counts = torch.bincount(segment, minlength=n_segments)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(m, device=keys.device)
    rank = torch.empty_like(position)
    rank[order] = position - starts[segment[order]]
    return rank


def segment_sizes(segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Number of instances of each segment, (n_segments,) long."""
    return torch.bincount(segment, minlength=n_segments)


def segment_argmax(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Index (into the packed M instances) of the largest value of each segment; first one on ties.

    Empty segments get index -1.
    """
    rank = segment_rank(values, segment, n_segments, descending=True)
    out = segment.new_full((n_segments,), -1)
    top = rank == 0
    out[segment[top]] = torch.nonzero(top, as_tuple=True)[0]
    return out
