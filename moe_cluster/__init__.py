"""moe-cluster: train Mixture-of-Experts language models on a Ray cluster."""

from .moe import MoELayer

__all__ = ["MoELayer", "__version__"]
__version__ = "0.1.0"
