"""Mixture-of-Experts layer: router, experts, layer."""

from .experts import DenseMLP, GroupedExperts
from .layer import MoELayer, MoEStats
from .router import Router, Routing, expert_capacity, load_balancing_loss, z_loss

__all__ = [
    "DenseMLP",
    "GroupedExperts",
    "MoELayer",
    "MoEStats",
    "Router",
    "Routing",
    "expert_capacity",
    "load_balancing_loss",
    "z_loss",
]
