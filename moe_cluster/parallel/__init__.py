"""The parallel layout, and the functions that apply parallelism to a single-device model.

``Layout`` (layout.py) is plain integers and loads without torch: the job"s schemas, the
planner and the controller read it on machines without a GPU stack.
"""

from .layout import Layout


def __getattr__(name: str):
    # Imported on first use (the names below need torch or NumPy); a submodule name falls
    # through to AttributeError, so that ``from . import <submodule>`` imports it.
    if name in ("apply_expert_parallel", "clip_grad_norm", "is_expert_param", "sync_gradients"):
        from . import apply as module
    elif name in ("apply_activation_checkpointing",):
        from . import checkpointing as module
    elif name in ("apply_fsdp", "expert_shard_dim", "is_sharded", "on_current_mesh", "reshard", "shard_offset"):
        from . import fsdp as module
    elif name in ("ProcessGroups", "build_process_groups"):
        from . import mesh as module
    elif name in ("parallelize",):
        from . import order as module  # not parallelize.py: a submodule named like the function would shadow it
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


__all__ = ["Layout", "ProcessGroups", "apply_activation_checkpointing", "apply_expert_parallel", "apply_fsdp", "build_process_groups", "clip_grad_norm", "expert_shard_dim", "is_expert_param", "is_sharded", "on_current_mesh", "parallelize", "reshard", "shard_offset", "sync_gradients"]  # fmt: skip
