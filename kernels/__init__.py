"""moe_kernels: token permutation and grouped expert GEMMs for Mixture-of-Experts layers.

Triton kernels for GPUs, an eager fast path for CPUs, and readable references that both are
tested against. This package never imports ``moe_cluster``.
"""

from .mlp import ACTIVATIONS, GradientBuffers, activation_forward, check_activation
from .ops import BACKENDS, RoutingPlan, expert_mlp, grouped_mm, moe_mlp, permute, resolve_backend, route, unpermute

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "GradientBuffers",
    "RoutingPlan",
    "activation_forward",
    "check_activation",
    "expert_mlp",
    "grouped_mm",
    "moe_mlp",
    "permute",
    "resolve_backend",
    "route",
    "unpermute",
]
