"""Checks of an assembled job before anything starts, each naming the key and the fix.

``validate`` runs small pure checks in order: every field's range and choice first (the later
rules divide by some of them), then the job's shape (its ``Layout``, sequence length, engine),
the model's choices, the files it reads, then what the cluster can place. Ranges, choices and
shape need no torch; the model's choices and the DeepSpeed section import what defines them. The memory plan is not among them:
it needs the model's shapes (torch), and the launcher and ``moe-cluster plan`` call it
(``moe_cluster.plan.check_memory``).
"""

from __future__ import annotations

import math
import os

from ..data.config import DATA_SOURCES, DataConfig, check_sources
from ..model.config import Rule, is_bool, raise_first_failure
from ..train.config import ENGINES, NAN_POLICIES, check_train_config
from .assemble import data_vocab, deepspeed_user_config, job_layout
from .schema import (
    PLACEMENT_STRATEGIES, RECOVERY_MODES, WANDB_MODES, ClusterConfig, JobConfig, LoggerConfig, ParallelConfig,
    TrainerConfig,
)  # fmt: skip


def validate(cfg: JobConfig, cluster_resources: dict | None = None, *, files: bool = True) -> None:
    """Check an assembled job before anything starts; ``cluster_resources`` is ``ray.cluster_resources()``.

    ``files=False`` leaves out what needs the job's files (the data folder): ``moe-cluster submit``
    validates on a machine that may not have them; the job validates again where it runs.
    """
    check_ranges(cfg)
    check_choices(cfg)
    check_shape(cfg)
    check_model_choices(cfg)
    if files:
        check_files(cfg)
    if cluster_resources is not None:
        check_resources(cfg, cluster_resources)


def check_ranges(cfg: JobConfig) -> None:
    """Every field's range, section by section (the model's and optimizer's live with their schemas)."""
    cfg.model.validate()
    cfg.trainer.optim.validate("trainer.optim")
    raise_first_failure(job_rules(cfg))


def check_choices(cfg: JobConfig) -> None:
    """Every job-level string field with choices, and each ``data.mixture`` source's path and weight."""
    raise_unknown_choice(job_choices(cfg))
    check_sources(cfg.data.mixture)


def check_model_choices(cfg: JobConfig) -> None:
    """The model's string choices, which a worker would only reject while building its model (the
    kernels' and router's own lists: imported here, they need torch)."""
    _check_model_choices(cfg.model)


def check_shape(cfg: JobConfig) -> None:
    """How the sections fit together: the job's layout (``Layout`` holds the divisibility and FSDP
    rules), the sequence length, the engine's own settings."""
    t = cfg.trainer
    layout = job_layout(cfg)
    if t.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    check_train_config(t)
    if t.engine == "deepspeed":
        from ..train.ds_config import resolve_config

        resolve_config(deepspeed_user_config(cfg), layout, t.optim)


def check_files(cfg: JobConfig) -> None:
    """The data folder(s) the job reads: whole, their ids within the vocabulary, big enough."""
    _validate_data(cfg.data, cfg.model)
    _validate_split_sizes(cfg.data, cfg.trainer)


def check_resources(cfg: JobConfig, cluster_resources: dict) -> None:
    """What the Ray cluster can place: the workers' CPUs and GPUs."""
    c = cfg.cluster
    need_cpu = c.num_workers * c.cpus_per_worker
    have_cpu = cluster_resources.get("CPU", 0)
    if need_cpu > have_cpu:
        raise ValueError(
            f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker} needs "
            f"{need_cpu:g} CPUs but the Ray cluster has {have_cpu:g}; lower cluster.num_workers or "
            f"cluster.cpus_per_worker, or add nodes"
        )
    if c.use_gpu and c.num_workers > cluster_resources.get("GPU", 0):
        raise ValueError(
            f"cluster.use_gpu=true needs {c.num_workers} GPUs (one per worker) but the Ray cluster has "
            f"{cluster_resources.get('GPU', 0):g}; lower cluster.num_workers or set cluster.use_gpu=false"
        )


# -- ranges and choices, one table per section (the model's and optimizer's live with their schemas)


def job_rules(cfg: JobConfig) -> list[Rule]:
    """Every range of the job-level sections, in the order they are reported."""
    return [
        *_cluster_rules(cfg.cluster), *_parallel_rules(cfg.parallel), *_trainer_rules(cfg.trainer),
        *_data_rules(cfg.data), *_logger_rules(cfg.logger),
        ("resume", cfg.resume, is_bool(cfg.resume), "true or false"),
        ("resume_with_changes", cfg.resume_with_changes, is_bool(cfg.resume_with_changes), "true or false"),
    ]  # fmt: skip


def _parallel_rules(p: ParallelConfig) -> list[Rule]:
    return [
        ("parallel.ep", p.ep, p.ep >= 1, ">= 1"),
        ("parallel.fsdp", p.fsdp, is_bool(p.fsdp, optional=True), "true, false or null (on when world > 1)"),
    ]


def _trainer_rules(t: TrainerConfig) -> list[Rule]:
    rules = [
        ("max_steps", t.max_steps, t.max_steps >= 1, ">= 1"),
        ("global_batch_size", t.global_batch_size, t.global_batch_size >= 1, ">= 1"),
        ("grad_accum", t.grad_accum, t.grad_accum >= 1, ">= 1"),
        ("seq_len", t.seq_len, t.seq_len >= 1, ">= 1"),
        # The sampler seeds torch with seed * 1,000,003 + epoch (64 bits): a 32-bit seed leaves it room.
        ("seed", t.seed, 0 <= t.seed < 2**32, "in [0, 2^32)"),
        ("eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0: never)"),
        ("eval_batches", t.eval_batches, t.eval_batches >= 1, ">= 1 (to never evaluate: trainer.eval_every=0)"),
        ("checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 0, ">= 0 (0: never)"),
        ("keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, ">= 1"),
        ("peak_flops", t.peak_flops, 0 <= t.peak_flops < math.inf, "finite and >= 0 (0: MFU not reported)"),
        ("max_nan_skips", t.max_nan_skips, t.max_nan_skips >= 1, ">= 1"),
        ("max_failures", t.max_failures, t.max_failures >= 0, ">= 0"),
        ("step_timeout_s", t.step_timeout_s, 0 < t.step_timeout_s < math.inf, "> 0 and finite"),
        ("startup_grace_s", t.startup_grace_s, 0 <= t.startup_grace_s < math.inf, ">= 0 and finite"),
        ("capacity_timeout_s", t.capacity_timeout_s, 0 < t.capacity_timeout_s < math.inf, "> 0 and finite"),
        ("snapshot_every", t.snapshot_every, t.snapshot_every >= 1, ">= 1"),
    ]
    return [(f"trainer.{key}", *rest) for key, *rest in rules]


def _cluster_rules(c: ClusterConfig) -> list[Rule]:
    n, cpus, local, mem = c.num_workers, c.cpus_per_worker, c.local_num_cpus, c.memory_gb_per_worker
    return [
        ("cluster.num_workers", n, n >= 1, ">= 1"),
        ("cluster.use_gpu", c.use_gpu, is_bool(c.use_gpu), "true or false"),
        ("cluster.cpus_per_worker", cpus, 0 < cpus < math.inf, "finite and > 0 (Ray takes fractions: 0.5)"),
        ("cluster.local_num_cpus", local, local is None or local >= 1, ">= 1 (or null: enough for the workers)"),
        ("cluster.min_workers", c.min_workers, 1 <= c.min_workers <= n, f"between 1 and cluster.num_workers={n}"),
        ("cluster.resize_check_s", c.resize_check_s, 0 <= c.resize_check_s < math.inf, ">= 0 and finite"),
        ("cluster.gpu_memory_gb", c.gpu_memory_gb, 0 < c.gpu_memory_gb < math.inf, "> 0 and finite (10^9 bytes)"),
        ("cluster.memory_gb_per_worker", mem, mem is None or 0 < mem < math.inf, "> 0 and finite (10^9 bytes; or null: the node's share)"),
        ("cluster.insecure", c.insecure, is_bool(c.insecure), "true or false"),
    ]  # fmt: skip


def _data_rules(d: DataConfig) -> list[Rule]:
    return [("data.max_bytes", d.max_bytes, d.max_bytes is None or d.max_bytes >= 1, ">= 1 (or null: all)")]


def _logger_rules(lg: LoggerConfig) -> list[Rule]:
    every = lg.progress_every
    return [
        ("logger.console", lg.console, is_bool(lg.console), "true or false"),
        ("logger.progress_every", every, every >= 1, ">= 1 (steps between progress lines)"),
        ("logger.plots", lg.plots, is_bool(lg.plots), "true or false"),
        ("logger.wandb.enabled", lg.wandb.enabled, is_bool(lg.wandb.enabled), "true or false"),
    ]


def job_choices(cfg: JobConfig) -> list[tuple[str, object, tuple]]:
    """(key, value, the values allowed) for the job-level string fields with choices."""
    t = cfg.trainer
    rows = [
        ("trainer.engine", t.engine, ENGINES),
        ("trainer.recovery", t.recovery, RECOVERY_MODES),
        ("trainer.nan_policy", t.nan_policy, NAN_POLICIES),
        ("cluster.placement_strategy", cfg.cluster.placement_strategy, PLACEMENT_STRATEGIES),
        ("data.source", cfg.data.source, DATA_SOURCES),
    ]
    if cfg.logger.wandb.mode is not None:  # null: online with WANDB_API_KEY, else offline (resolve_mode)
        rows.append(("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES))
    return rows


def raise_unknown_choice(rows) -> None:
    """``KEY='VALUE' is unknown; use one of: A, B`` for the first value not among its choices."""
    for key, value, allowed in rows:
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is unknown; use one of: {', '.join(allowed)}")


def _check_model_choices(m) -> None:
    from moe_kernels import ACTIVATIONS, BACKENDS

    from ..moe.router import BALANCE_SCOPES, SCORE_FUNCTIONS

    raise_unknown_choice([
        ("model.moe.activation", m.moe.activation, ACTIVATIONS),
        ("model.moe.backend", m.moe.backend, BACKENDS),
        ("model.moe.router", m.moe.router, SCORE_FUNCTIONS),
        ("model.moe.balance_scope", m.moe.balance_scope, BALANCE_SCOPES),
    ])  # fmt: skip


def _validate_data(d: DataConfig, m) -> None:
    """The data folder(s) exist, are whole, and their token ids fit the model's vocabulary."""
    data = data_vocab(d)
    vocab = data["vocab_size"] if m.vocab_size is None else m.vocab_size
    if d.source == "stdlib":
        if vocab < 256:
            raise ValueError(f"data.source=stdlib is byte-level (ids 0-255) but model.vocab_size={vocab}; use >= 256")
        return
    if data["max_token_id"] >= vocab:
        what = "data.mixture" if d.mixture else f"data.path={d.path}"
        raise ValueError(
            f"{what} holds token ids up to {data['max_token_id']} but model.vocab_size={vocab}; set model.vocab_size "
            f"to at least {data['max_token_id'] + 1} (the data's vocabulary is {data['vocab_size']}), or to null "
            "to take the data's"
        )


def _validate_split_sizes(d: DataConfig, t) -> None:
    """Each prepared split holds at least one global batch of windows (the validation split only
    when the job evaluates): found here, before any worker starts, not at the first evaluation."""
    if d.source != "bin":
        return
    import numpy as np

    from ..data import read_meta
    from ..data.corpus import BIN_DTYPES

    splits = ("train", "val") if t.eval_every else ("train",)
    # A single folder's sampler draws a global batch of distinct windows; a mixture's draws each
    # source by weight, with replacement across epochs, and needs one window of each (as the samplers check).
    need = 1 if d.mixture else t.global_batch_size
    for folder in [s.path for s in d.mixture] if d.mixture else [d.path]:
        itemsize = np.dtype(BIN_DTYPES[read_meta(folder)["dtype"]]).itemsize
        for split in splits:
            path = f"{folder}/{split}.bin"
            windows = (os.path.getsize(path) // itemsize - 1) // t.seq_len
            if windows < need and d.mixture:
                raise ValueError(
                    f"{path} (a data.mixture source) holds less than one window of trainer.seq_len={t.seq_len} "
                    "tokens; lower trainer.seq_len or prepare more text"
                )
            if windows < need:
                raise ValueError(
                    f"{path} holds {windows} windows of trainer.seq_len={t.seq_len} tokens, fewer than one global batch "
                    f"(trainer.global_batch_size={t.global_batch_size}); lower trainer.seq_len or "
                    f"trainer.global_batch_size, prepare more text"
                    + (", or a larger --val-fraction (or trainer.eval_every=0)" if split == "val" else "")
                )
