"""Networks: patch encoders (CTransPath, ...) and MIL heads (SMILE and baselines), one per file."""

from scripts.networks.registry import MIL_NETWORKS, build_mil_network, register_mil_network

__all__ = ["MIL_NETWORKS", "build_mil_network", "register_mil_network"]

import scripts.networks.mean_pool  # noqa: E402,F401
import scripts.networks.max_pool  # noqa: E402,F401
import scripts.networks.abmil  # noqa: E402,F401
import scripts.networks.clam  # noqa: E402,F401
import scripts.networks.transmil  # noqa: E402,F401
import scripts.networks.dsmil  # noqa: E402,F401
import scripts.networks.dtfd  # noqa: E402,F401
import scripts.networks.acmil  # noqa: E402,F401
import scripts.networks.smile_adaptive  # noqa: E402,F401
