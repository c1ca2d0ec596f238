"""Networks: patch encoders (CTransPath, ...) and MIL heads (SMILE and baselines), one per file."""

from scripts.networks.registry import MIL_NETWORKS, build_mil_network, register_mil_network
from scripts.networks import smile  # noqa: F401,E402  (registers "smile")

__all__ = ["MIL_NETWORKS", "build_mil_network", "register_mil_network"]
