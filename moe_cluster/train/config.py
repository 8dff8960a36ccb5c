"""The ``trainer`` section's rank-side schema: what every rank's Trainer reads. Data only (no
torch): the job's schemas load on machines without the training stack. The defaults are the
shipped ones (conf/trainer/default.yaml; tests/test_config.py keeps the two equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..model.config import raise_first_failure
from ..parallel.layout import ENGINES

NAN_POLICIES = ("stop", "skip")


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    decay_steps: int = 600  # steps of cosine decay after warmup (then min_lr)
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


@dataclass
class TrainConfig:
    """What every rank's Trainer reads. The job schema ``trainer`` (moe_cluster.config.TrainerConfig)
    extends it with the keys only the controller reads (timeouts, failure budget)."""

    max_steps: int = 600  # optimizer steps of the whole job
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step (the balancing loss is per micro-batch)
    seq_len: int = 128  # tokens per sequence
    seed: int = 0  # model init and data order
    eval_every: int = 100  # steps between validation passes (0: never)
    eval_batches: int = 4  # global batches per validation pass
    checkpoint_every: int = 50  # steps between checkpoints (0: never); also the most steps a failure can cost
    keep_checkpoints: int = 3  # complete checkpoints kept
    peak_flops: float = 0.0  # per-rank peak FLOP/s for MFU (0: MFU not reported)
    engine: str = "native"  # "native", or "deepspeed" (ZeRO stage 1 or 2, configured by the deepspeed section)
    nan_policy: str = "stop"  # a non-finite loss or gradient norm: "stop" the job (final), or "skip" the step
    max_nan_skips: int = 10  # nan_policy=skip: consecutive skipped steps after which the job stops as diverged
    optim: OptimConfig = field(default_factory=OptimConfig)


def check_train_config(t: TrainConfig) -> None:
    """The choices every rank's Trainer depends on, and how they combine (``config.validate``
    checks them too, before anything starts, among every other key's range)."""
    if t.engine not in ENGINES:
        raise ValueError(f"trainer.engine={t.engine!r} is unknown; use one of: {', '.join(ENGINES)}")
    if t.nan_policy not in NAN_POLICIES:
        raise ValueError(f"trainer.nan_policy={t.nan_policy!r} is unknown; use one of: {', '.join(NAN_POLICIES)}")
    if t.nan_policy == "skip" and t.engine == "deepspeed":
        raise ValueError(
            "trainer.nan_policy=skip needs the native engine: DeepSpeed's own step has run before the Trainer "
            "sees the step's gradient norm; use trainer.nan_policy=stop, or trainer.engine=native"
        )
