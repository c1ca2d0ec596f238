"""One bag in, one logit out: the form MONAI bundle tools (verify_net_in_out, ckpt_export) expect.

MONAI's bundle checks feed ``torch.rand(1, num_channels, *spatial_shape)`` to ``network_def``, i.e. a
channel-first bag ``(1, 768, N)``. :class:`BagClassifier` wraps any registered MIL network (SMILE by
default) and accepts

* ``(B, C, N)`` channel-first bags (``channel_first=True``, the bundle's metadata format), or
* ``(B, N, C)`` / ``(N, C)`` bags (``channel_first=False``),

returning logits ``(B, 1)``; :meth:`forward_with_attention` also returns the per-patch attention
``(B, N)``. The wrapper is TorchScript-scriptable (``torch.jit.script``), which is what
``python -m monai.bundle ckpt_export`` and the Model Zoo CI use: only ``forward_packed`` of the wrapped
network is compiled (its Python-side conveniences, the multi-form ``forward`` and properties such as
``config``, are marked unused on a scripting copy by :meth:`__prepare_scriptable__`). Its state_dict is the wrapped network's under ``mil.``;
:meth:`load_mil_state_dict` loads a bare MIL-network state_dict too.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping

import torch
from torch import nn

from scripts.networks.registry import build_mil_network


class BagClassifier(nn.Module):
    """Wrap a MIL network for single-tensor bag input.

    Args:
        mil_network: an ``nn.Module`` following ``scripts.networks.base.MILNetwork`` (``forward_packed``),
            or the registered name of one (``"smile"``), built with ``network_kwargs``.
        channel_first: input is ``(B, C, N)`` (True, default) or ``(B, N, C)`` (False).
        network_kwargs: constructor arguments when ``mil_network`` is a name.
    """

    def __init__(self, mil_network: nn.Module | str = "smile", channel_first: bool = True, **network_kwargs: Any) -> None:
        super().__init__()
        if isinstance(mil_network, str):
            mil_network = build_mil_network(mil_network, **network_kwargs)
        elif network_kwargs:
            raise ValueError("network_kwargs are only used when mil_network is a registered name")
        if not hasattr(mil_network, "forward_packed"):
            raise TypeError(f"{type(mil_network).__name__} has no forward_packed(x, bag_index, n_bags); "
                            "wrap a network that follows scripts.networks.base.MILNetwork")
        self.mil = mil_network
        self.channel_first = bool(channel_first)

    def _packed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if x.dim() == 2:  # one bag without the batch dimension
            x = x.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError("expected bags (B, C, N) when channel_first, else (B, N, C)")
        if self.channel_first:
            x = x.transpose(1, 2)
        b = x.shape[0]
        n = x.shape[1]
        index = torch.arange(b, device=x.device).repeat_interleave(n)
        return x.reshape(b * n, x.shape[2]), index, b, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, index, b, n = self._packed(x)
        out = self.mil.forward_packed(flat, index, b)
        return out["logits"].reshape(b, 1)

    @torch.jit.export
    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, 1)`` and per-patch attention ``(B, N)`` (each row sums to 1)."""
        flat, index, b, n = self._packed(x)
        out = self.mil.forward_packed(flat, index, b)
        return out["logits"].reshape(b, 1), out["attention"].reshape(b, n)

    @torch.jit.unused
    def load_mil_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load either this wrapper's state_dict (``mil.*`` keys) or a bare MIL network's."""
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if state_dict and all(k.startswith("mil.") for k in state_dict):
            return self.load_state_dict(state_dict, strict=strict)
        return self.mil.load_state_dict(state_dict, strict=strict)

    def __prepare_scriptable__(self) -> "BagClassifier":
        """Called by ``torch.jit.script``: a shallow copy (same parameters) whose wrapped network has its
        ``forward`` and properties marked unused, so TorchScript compiles only ``forward_packed``."""
        clone = copy.copy(self)
        clone._modules = dict(self._modules)
        mil = copy.copy(self.mil)
        cls = type(self.mil)
        properties = [name for name, value in inspect.getmembers(cls) if isinstance(value, property)]
        mil.__class__ = type(cls.__name__, (cls,), {
            "forward": torch.jit.unused(cls.forward),
            "__jit_unused_properties__": list(getattr(cls, "__jit_unused_properties__", [])) + properties,
            "__module__": cls.__module__,
        })
        clone._modules["mil"] = mil
        return clone
