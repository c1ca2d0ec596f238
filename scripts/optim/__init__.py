"""Optimisers written for this bundle (timm provides the rest by name; see ``scripts.engines.mil.create_optimizer``)."""

from scripts.optim.ranger import Ranger

__all__ = ["Ranger"]
