"""Networks: patch encoders (CTransPath, ...) and MIL heads (SMILE and baselines), one per file.

Importing this package registers every MIL head under its name (see ``registry.MIL_NETWORKS``).
Encoders (``ctranspath``, ``encoders``) are imported on demand so MIL-only code does not load timm.
"""

from scripts.networks import (  # noqa: F401,E402  (each module registers its network)
    abmil,
    acmil,
    clam,
    dsmil,
    dtfd,
    max_pool,
    mean_pool,
    smile,
    smile_adaptive,
    transmil,
)
from scripts.networks.registry import MIL_NETWORKS, build_mil_network, register_mil_network

__all__ = ["MIL_NETWORKS", "build_mil_network", "register_mil_network"]
