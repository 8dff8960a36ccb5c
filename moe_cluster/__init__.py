"""moe-cluster: train Mixture-of-Experts language models on a Ray cluster."""

__all__ = ["MoELayer", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: `moe-cluster status|logs|list|stop` and the config tools need no torch
    # (importing it costs more than a second per command).
    if name == "MoELayer":
        from .moe import MoELayer

        return MoELayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
