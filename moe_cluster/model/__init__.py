"""The MoE transformer language model and its presets."""

from .config import PRESETS, ModelConfig, MoEConfig, preset
from .transformer import Transformer, flops_per_token, num_params

__all__ = ["PRESETS", "ModelConfig", "MoEConfig", "Transformer", "flops_per_token", "num_params", "preset"]
