"""The MoE transformer language model and its presets."""

from .config import PRESETS, ModelConfig, MoEConfig, architecture_differences, preset
from .transformer import Transformer, flops_per_token, num_params

__all__ = ["PRESETS", "ModelConfig", "MoEConfig", "architecture_differences", "Transformer", "flops_per_token", "num_params", "preset"]
