"""Name -> MIL network class, so a config switches methods with one string."""

from __future__ import annotations

from typing import Callable

from torch import nn

MIL_NETWORKS: dict[str, type[nn.Module]] = {}


def register_mil_network(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIL_NETWORKS and MIL_NETWORKS[name] is not cls:
            raise ValueError(f"MIL network name {name!r} is already registered")
        MIL_NETWORKS[name] = cls
        return cls

    return decorator


def build_mil_network(name: str, **kwargs) -> nn.Module:
    """Build a registered MIL network by name (e.g. ``"smile"``, ``"abmil_gated"``)."""
    if name not in MIL_NETWORKS:
        raise KeyError(f"unknown MIL network {name!r}; registered: {', '.join(sorted(MIL_NETWORKS))}")
    return MIL_NETWORKS[name](**kwargs)
