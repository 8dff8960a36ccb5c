"""Parallel layout and the functions that apply parallelism to a single-device model."""

from .apply import apply_expert_parallel, clip_grad_norm, is_expert_param, sync_gradients
from .mesh import ParallelLayout, ProcessGroups, build_process_groups

__all__ = [
    "ParallelLayout",
    "ProcessGroups",
    "apply_expert_parallel",
    "build_process_groups",
    "clip_grad_norm",
    "is_expert_param",
    "sync_gradients",
]
