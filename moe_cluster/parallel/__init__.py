"""Parallel layout and the functions that apply parallelism to a single-device model."""

from .apply import apply_expert_parallel, clip_grad_norm, is_expert_param, sync_gradients
from .checkpointing import apply_activation_checkpointing
from .fsdp import apply_fsdp, expert_shard_dim, fsdp_enabled, is_sharded, on_current_mesh, reshard, shard_offset
from .mesh import ParallelLayout, ProcessGroups, build_process_groups

__all__ = [
    "ParallelLayout",
    "ProcessGroups",
    "apply_activation_checkpointing",
    "apply_expert_parallel",
    "apply_fsdp",
    "build_process_groups",
    "clip_grad_norm",
    "expert_shard_dim",
    "fsdp_enabled",
    "is_expert_param",
    "is_sharded",
    "on_current_mesh",
    "reshard",
    "shard_offset",
    "sync_gradients",
]
