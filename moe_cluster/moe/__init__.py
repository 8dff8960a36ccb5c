"""Mixture-of-Experts layer: router, experts, layer."""

from .dispatch import ExpertParallel
from .experts import DenseMLP, GroupedExperts
from .layer import MoELayer, MoEStats
from .router import Router, Routing, expert_capacity, load_balancing_loss, z_loss

__all__ = [
    "DenseMLP",
    "ExpertParallel",
    "GroupedExperts",
    "MoELayer",
    "MoEStats",
    "Router",
    "Routing",
    "expert_capacity",
    "load_balancing_loss",
    "z_loss",
]
