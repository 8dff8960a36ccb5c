"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..model.config import raise_first_failure


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    decay_steps: int = 1000  # steps of cosine decay after warmup (then min_lr)
    weight_decay: float = 0.1  # AdamW decay, applied to matrices (dim >= 2) only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def validate(self, prefix: str = "trainer.optim") -> None:
        """Each field's range, as lr_at, AdamW and clip_grad_norm read it."""
        lr, min_lr = self.lr, self.min_lr
        raise_first_failure((f"{prefix}.{key}", *rest) for key, *rest in [
            ("lr", lr, 0 < lr < math.inf, "finite and > 0"),
            # min_lr = lr: a constant rate after warmup; above lr the "decay" would climb.
            ("min_lr", min_lr, 0 <= min_lr <= lr, f"between 0 and {prefix}.lr={lr}"),
            ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0 (0: no warmup)"),
            ("decay_steps", self.decay_steps, self.decay_steps >= 0, ">= 0 (0: min_lr right after warmup)"),
            ("weight_decay", self.weight_decay, 0 <= self.weight_decay < math.inf, "finite and >= 0"),
            # AdamW's moving averages: a beta of 1 never forgets its first gradient (and divides by 0).
            ("beta1", self.beta1, 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", self.beta2, 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps, 0 < self.eps < math.inf, "finite and > 0"),
            ("grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0 (0: no clipping)"),
        ])  # fmt: skip


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Matrices decay, vectors (norm scales) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    # foreach=False: the single-tensor loop's arithmetic is the same on every layout, which keeps
    # runs with different expert sharding bitwise comparable.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.decay_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
