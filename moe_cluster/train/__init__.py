"""Training: the optimizer step, checkpoints, and the per-rank Trainer."""

from .optim import OptimConfig, build_optimizer, lr_at
from . import checkpoint
from .trainer import DataConfig, TrainConfig, Trainer

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "Trainer", "build_optimizer", "lr_at"]
