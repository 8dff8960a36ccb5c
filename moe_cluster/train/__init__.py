"""Training: the optimizer step, checkpoints, and the per-rank Trainer.

The ``trainer`` section"s schema (config.py) loads without torch.
"""

from ..data.config import DataConfig  # the data section, where the Trainer takes it
from .config import OptimConfig, TrainConfig


def __getattr__(name: str):
    # Imported on first use (the names below need torch or NumPy); a submodule name falls
    # through to AttributeError, so that ``from . import <submodule>`` imports it.
    if name in ("build_optimizer", "lr_at"):
        from . import optim as module
    elif name in ("Trainer",):
        from . import trainer as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "Trainer", "build_optimizer", "lr_at"]  # fmt: skip
