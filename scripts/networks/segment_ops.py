"""Operations over packed bags.

A batch of B bags is packed into one (M, D) tensor of instances plus ``bag_index`` (M,), the bag each
instance belongs to (0..B-1). Reductions within each bag use scatter operations, so a batch costs a few
kernels whatever B is: no Python loop over bags.
The functions are TorchScript-compatible (lists, not tuple unpacking, for shapes), so networks built
on them can be exported with ``torch.jit.script`` (``python -m monai.bundle ckpt_export``).

Sums, means and softmaxes accumulate in float32 whatever the input dtype: float16/bfloat16 inputs
(e.g. under ``torch.autocast``) are upcast and the result is float32 (under autocast the next layer casts
it back). Accumulating in bf16 is wrong at bag sizes: bf16 has an 8-bit mantissa, so adding 1,000
attention weights of ~1e-3 to a running sum near 1 loses them (a sum of 2.26 was measured for an
attention that should sum to 1). float64 inputs stay float64. Max and min are exact in any dtype.
"""

from __future__ import annotations

import torch


def segment_max(values: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Per-bag maximum of ``values`` (M,) or (M, K) -> (n_bags,) or (n_bags, K)."""
    shape = [n_bags] + list(values.shape[1:])
    out = values.new_full(shape, float("-inf"))
    index = _expand_index(bag_index, values)
    return out.scatter_reduce(0, index, values, reduce="amax", include_self=True)


def segment_min(values: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Per-bag minimum of ``values`` (M,) or (M, K) -> (n_bags,) or (n_bags, K)."""
    shape = [n_bags] + list(values.shape[1:])
    out = values.new_full(shape, float("inf"))
    index = _expand_index(bag_index, values)
    return out.scatter_reduce(0, index, values, reduce="amin", include_self=True)


def accumulation_dtype(values: torch.Tensor) -> torch.Tensor:
    """``values`` upcast to float32 when it is float16/bfloat16 (unchanged otherwise)."""
    if values.dtype == torch.float16 or values.dtype == torch.bfloat16:
        return values.float()
    return values


def segment_sum(values: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Per-bag sum of ``values`` (M,) or (M, K) -> (n_bags,) or (n_bags, K), accumulated in >= float32."""
    values = accumulation_dtype(values)
    shape = [n_bags] + list(values.shape[1:])
    return values.new_zeros(shape).index_add(0, bag_index, values)


def segment_mean(values: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Per-bag mean of ``values`` (M,) or (M, K), accumulated in >= float32."""
    values = accumulation_dtype(values)
    counts = torch.bincount(bag_index, minlength=n_bags).clamp_min(1).to(values.dtype)
    sums = segment_sum(values, bag_index, n_bags)
    return sums / counts.view([-1] + [1] * (values.dim() - 1))


def segment_softmax(logits: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Softmax of ``logits`` (M,) or (M, K) within each bag (numerically stable, computed in >= float32)."""
    logits = accumulation_dtype(logits)
    bag_max = segment_max(logits.detach(), bag_index, n_bags)
    shifted = torch.exp(logits - bag_max[bag_index])
    return shifted / segment_sum(shifted, bag_index, n_bags)[bag_index]


def pack_bags(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a list of (N_i, D) bags into (sum N_i, D) instances and their (sum N_i,) bag index."""
    if not bags:
        raise ValueError("pack_bags needs at least one bag")
    sizes = torch.tensor([b.shape[0] for b in bags], device=bags[0].device)
    if int(sizes.min()) == 0:
        raise ValueError("an empty bag (0 patches) cannot be classified; check the slide's tissue mask")
    bag_index = torch.repeat_interleave(torch.arange(len(bags), device=bags[0].device), sizes)
    return torch.cat(bags, 0), bag_index


def _expand_index(bag_index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if values.dim() == 1:
        return bag_index
    return bag_index.view([-1] + [1] * (values.dim() - 1)).expand_as(values)
