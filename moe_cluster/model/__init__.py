"""The MoE transformer language model and its presets.

The ``model`` section"s schema (config.py) loads without torch.
"""

from .config import PRESETS, ModelConfig, MoEConfig, architecture_differences, preset


def __getattr__(name: str):
    # Imported on first use (the names below need torch or NumPy); a submodule name falls
    # through to AttributeError, so that ``from . import <submodule>`` imports it.
    if name in ("Transformer", "flops_per_token", "num_params"):
        from . import transformer as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


__all__ = ["MoEConfig", "ModelConfig", "PRESETS", "Transformer", "architecture_differences", "flops_per_token", "num_params", "preset"]  # fmt: skip
