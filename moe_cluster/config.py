"""The job's configuration: dataclass schemas registered in Hydra's ConfigStore, and validation.

Every key here is public (docs, CLI overrides and outside tools use them). The groups in
``conf/`` fill these schemas in; Hydra rejects wrong types and unknown keys set without ``+``,
``to_job`` those added with ``+``, and ``validate`` checks what types cannot (every field's range,
divisibility, sizes, what the cluster can place) before any actor starts, naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .data.mixture import check_sources
from .model import ModelConfig
from .model.config import Rule, is_bool, raise_first_failure
from .train import DataConfig, OptimConfig, TrainConfig
from .train.trainer import ENGINES, NAN_POLICIES

if typing.TYPE_CHECKING:
    from omegaconf import DictConfig


RECOVERY_MODES = ("peers", "checkpoint")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD")
WANDB_MODES = ("online", "offline", "disabled")  # logger.wandb.mode, as wandb.init takes it
DATA_SOURCES = ("stdlib", "bin")


@dataclass
class ParallelConfig:
    ep: int = 2  # expert-parallel size: ranks each expert group is sharded over
    fsdp: bool | None = None  # shard weights, gradients and optimizer state (FSDP2); None: on when world > 1 (native engine)


@dataclass
class TrainerConfig(TrainConfig):
    """The ``trainer`` section: what every rank reads (``TrainConfig``), and what the controller reads."""

    checkpoint_dir: str | None = None  # default: <run dir>/checkpoints (use shared storage on a cluster)
    max_failures: int = 3  # recoveries allowed before the job gives up
    step_timeout_s: float = 60.0  # a step slower than this counts as hung (peer stuck in a collective)
    startup_grace_s: float = 120.0  # extra time for the first chunk after a (re)start (JIT, autotuning)
    capacity_timeout_s: float = 120.0  # how long to wait for the cluster to place all workers
    recovery: str = "peers"  # "peers": heal in place from snapshots in peers' memory; "checkpoint": restart all from disk
    snapshot_every: int = 1  # steps between in-memory snapshots (recovery=peers): the most steps a failure replays


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address ("auto", "ray://host:10001", ...); None: embedded local Ray
    num_workers: int = 2  # TrainWorker actors (ranks)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # CPU slots per worker
    placement_strategy: str = "PACK"  # "PACK" or "SPREAD" (workers on distinct nodes where possible)
    local_num_cpus: int | None = None  # CPUs of the embedded local Ray (None: enough for the workers)
    min_workers: int = 1  # fewest workers the job continues on after losing some (recovery=peers)
    resize_check_s: float = 30.0  # seconds between checks for capacity to grow back to num_workers
    gpu_memory_gb: float = 80.0  # memory of one worker's GPU (10^9 bytes): `moe-cluster plan` and validate plan against it
    memory_gb_per_worker: float | None = None  # host memory a CPU worker may use; None: its node's memory over the workers on it
    insecure: bool = False  # allow sending Ray's auth token unencrypted (ray://, http) to an address beyond loopback


@dataclass
class WandbConfig:
    enabled: bool = False  # log to wandb (logger=wandb turns it on)
    mode: str | None = None  # "online", "offline" or "disabled"; None: online with WANDB_API_KEY, else offline
    project: str = "moe-cluster"  # wandb project
    entity: str | None = None  # wandb team or user
    name: str | None = None  # run name; None: the run directory's name


@dataclass
class LoggerConfig:
    console: bool = True  # live progress line on the driver
    progress_every: int = 1  # steps between progress lines
    plots: bool = True  # expert-load heatmap PNG at each evaluation, loss-curve PNG at the end
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # The DeepSpeed config of trainer.engine=deepspeed, in DeepSpeed's own keys (its JSON schema),
    # plus config_path: a DeepSpeed JSON file the other keys are merged over. See conf/deepspeed/.
    deepspeed: dict[str, Any] = field(default_factory=lambda: {"config_path": None})
    run_dir: str | None = None  # metrics.jsonl, events.jsonl, checkpoints/; None: Hydra's run dir
    resume: bool = False  # continue the run in run_dir from its latest checkpoint
    resume_with_changes: bool = False  # resume although the data or the sequence shape differ from the checkpoint's (recorded as an event)


def register_configs() -> None:
    """Register the schemas; conf/config.yaml starts its defaults list with ``job_schema``."""
    # Imported here: the schemas, validate() and the planner need no Hydra (a GPU host may lack it).
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


def to_job(cfg: DictConfig) -> JobConfig:
    """The composed config as the JobConfig: the one conversion, for jobs/train.py
    and ``cli.compose_job``.

    Hydra applies ``+key=value`` with OmegaConf's ``force_add``, which adds the key whatever the
    node's struct flag or schema (the flag is still on; a key without ``+`` is refused by it), and
    ``OmegaConf.to_object`` then keeps the stray key as an attribute that nothing reads: a
    misspelt ``+trainer.max_stesp=100`` would run 600 steps, silently. So every key is checked
    against the dataclasses first, at any depth; a ``dict`` section (``deepspeed``) is free-form.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), JobConfig)
    if unknown:
        everywhere = schema_keys(JobConfig)
        free = ", ".join(k for k, tp in _schema_fields(JobConfig).items() if _is_dict(tp))
        raise ValueError(
            "; ".join(_unknown_key_message(key, siblings, everywhere) for key, siblings in unknown)
            + f". Only {free} takes keys the schema lacks (its tool's own); elsewhere fix the key's spelling"
        )
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:  # e.g. a data.mixture item without its path
        raise ValueError(f"{exc.full_key} has no default: set it") from None


def _schema_fields(schema: type) -> dict[str, Any]:
    # get_type_hints: the annotations are strings (``from __future__ import annotations``).
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _is_dict(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _nested(tp) -> type | None:
    """The dataclass a field's value must match (``list[T]``: each item's), or None for a leaf
    or a free-form ``dict``."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _nested(args[0])  # Optional[T]
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def unknown_keys(data: dict, schema: type, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(full key, its siblings' full keys) for each key of ``data`` (plain containers) that
    ``schema`` lacks; a list of dataclasses is checked item by item (``data.mixture[0].path``)."""
    fields = _schema_fields(schema)
    out = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            out.append((full, [f"{prefix}{name}" for name in fields]))
            continue
        inner = _nested(fields[key])
        if inner is None:
            continue
        if isinstance(value, dict):
            out += unknown_keys(value, inner, f"{full}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    out += unknown_keys(item, inner, f"{full}[{i}].")
    return out


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every key of the schema, sections and leaves, as a user would write it."""
    keys = []
    for name, tp in _schema_fields(schema).items():
        keys.append(f"{prefix}{name}")
        inner = _nested(tp)
        if inner is not None:
            sep = "[0]." if typing.get_origin(tp) is list else "."
            keys += schema_keys(inner, f"{prefix}{name}{sep}")
    return keys


def _unknown_key_message(key: str, siblings: list[str], everywhere: list[str]) -> str:
    """Names are matched on their last part: the shared section prefix would make every key of
    a section look close. A key in its section first, then a key of that name anywhere."""
    leaf = key.rsplit(".", 1)[-1]
    match = None
    for candidates in (siblings, everywhere):
        by_leaf: dict[str, str] = {}
        for k in candidates:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1)
        if close:
            match = by_leaf[close[0]]
            break
    return f"unknown key {key}" + (f" (did you mean {match}?)" if match else "")


def deepspeed_user_config(cfg: JobConfig) -> dict:
    """The user's DeepSpeed keys: the ``deepspeed`` section merged over its ``config_path`` JSON."""
    from .train.ds_config import user_config

    return user_config(cfg.deepspeed)


def assemble(cfg: JobConfig) -> JobConfig:
    """The job as the workers run it: files the config points at are read here, once, on the driver.

    ``model.init_from=hf:PATH``: PATH's config.json sets the architecture (the workers then load
    PATH's weights); ``trainer.engine=deepspeed``: the JSON at ``deepspeed.config_path`` is merged
    in (the workers may run on machines that do not have it); ``model.vocab_size=null`` (the
    default of ``data=bin``, conf/data/bin.yaml): the data's vocabulary, from its meta.json.
    """
    from .interop.hf_mixtral import resolve_model_config

    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
    if cfg.model.vocab_size is None:
        try:
            vocab = data_vocab(cfg.data)["vocab_size"]
        except ValueError:
            vocab = None  # the data is not readable here (`moe-cluster plan` on a laptop): validate says why
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if cfg.trainer.engine == "deepspeed":
        cfg = dataclasses.replace(cfg, deepspeed=deepspeed_user_config(cfg))
    return cfg


def validate(cfg: JobConfig, cluster_resources: dict | None = None, *, files: bool = True, memory: bool = True) -> None:
    """Check an assembled job before anything starts; ``cluster_resources`` is ``ray.cluster_resources()``.

    ``files=False`` leaves out what needs the job's files (the data folder): ``moe-cluster submit``
    validates on a machine that may not have them; the job validates again where it runs.
    ``memory``: refuse a job whose ranks cannot fit their memory (``moe_cluster.plan``), with the
    plan and the knobs that would make it fit.

    Every field's range comes first (the later rules divide by some of them), then how the
    sections fit together.
    """
    m = cfg.model
    m.validate()
    cfg.trainer.optim.validate("trainer.optim")
    raise_first_failure(job_rules(cfg))
    raise_unknown_choice(job_choices(cfg))
    check_sources(cfg.data.mixture)
    p, t, c = cfg.parallel, cfg.trainer, cfg.cluster
    if m.moe.num_experts % p.ep:
        raise ValueError(
            f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.ep={p.ep}; "
            f"set parallel.ep to a divisor of {m.moe.num_experts}"
        )
    if p.ep > c.num_workers:
        raise ValueError(
            f"parallel.ep={p.ep} is larger than cluster.num_workers={c.num_workers}; "
            f"lower parallel.ep or raise cluster.num_workers"
        )
    if c.num_workers % p.ep:
        raise ValueError(
            f"cluster.num_workers={c.num_workers} is not a multiple of parallel.ep={p.ep}; "
            f"use {c.num_workers - c.num_workers % p.ep or p.ep} or {c.num_workers + p.ep - c.num_workers % p.ep} workers"
        )
    if t.global_batch_size % (c.num_workers * t.grad_accum):
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by cluster.num_workers="
            f"{c.num_workers} x trainer.grad_accum={t.grad_accum}"
        )
    if t.seq_len > m.max_seq_len:
        raise ValueError(f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.engine == "deepspeed" and p.fsdp:
        raise ValueError(
            "parallel.fsdp=true shards the native engine's state; trainer.engine=deepspeed shards with ZeRO "
            "(the deepspeed section): set parallel.fsdp=false (or leave it unset), or trainer.engine=native"
        )
    if t.engine == "deepspeed" and t.nan_policy == "skip":
        raise ValueError(
            "trainer.nan_policy=skip needs the native engine: DeepSpeed's own step has run before the Trainer "
            "sees the step's gradient norm; use trainer.nan_policy=stop, or trainer.engine=native"
        )
    if t.engine == "deepspeed":
        from .train.ds_config import resolve_config

        resolve_config(
            deepspeed_user_config(cfg), global_batch_size=t.global_batch_size, grad_accum=t.grad_accum,
            world_size=c.num_workers, optim=t.optim,
        )  # fmt: skip
    _validate_model_choices(m)
    if files:
        _validate_data(cfg.data, m)
        _validate_split_sizes(cfg.data, cfg.trainer)
    if cluster_resources is not None:
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
    if memory:
        _validate_memory(cfg, cluster_resources, files)


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


def _validate_memory(cfg: JobConfig, cluster_resources: dict | None, files: bool) -> None:
    """The plan against GPU memory, or a CPU worker's host memory where that is known: on a
    cluster's resources, ``cluster.memory_gb_per_worker``, or this machine when the job runs here
    (``files``: not ``moe-cluster submit`` on a laptop, for a cluster)."""
    if cfg.model.vocab_size is None:
        return  # the data's vocabulary: planned where the job runs, once assemble has read it
    from .plan import plan_job, refusal, runs_here

    here = files and runs_here(cfg)
    plan = plan_job(cfg, cluster_resources, here=here)
    if not plan.fits:
        raise ValueError(refusal(cfg, plan, cluster_resources, here=here))


def _validate_model_choices(m) -> None:
    """The string choices a worker would only reject while building its model."""
    from moe_kernels import ACTIVATIONS, BACKENDS

    from .moe.router import SCORE_FUNCTIONS

    raise_unknown_choice([
        ("model.moe.activation", m.moe.activation, ACTIVATIONS),
        ("model.moe.backend", m.moe.backend, BACKENDS),
        ("model.moe.router", m.moe.router, SCORE_FUNCTIONS),
    ])  # fmt: skip


def data_vocab(d: DataConfig) -> dict:
    """The data's ``vocab_size`` (model.vocab_size's default) and ``max_token_id`` (what it must cover).

    Reads the prepared folders' meta.json (read_meta, read_mixture): a missing or incomplete
    folder, bad mixture weights or mixed tokenizers raise ValueError here.
    """
    if d.mixture and d.source != "bin":
        raise ValueError(f"data.mixture reads prepared folders: use data=bin (data.source={d.source!r})")
    if d.source == "stdlib":
        return {"vocab_size": 256, "max_token_id": 255}
    if d.source != "bin":
        raise ValueError(f"data.source={d.source!r} is unknown; use 'stdlib' or 'bin'")
    if d.mixture:
        if d.path:
            raise ValueError(f"set data.path or data.mixture, not both (data.path={d.path}); data.path=null")
        from .data import read_mixture

        return read_mixture(d.mixture)
    if not d.path:
        raise ValueError(
            "data.source=bin needs data.path, the folder that `moe-cluster prepare` wrote, or "
            "data.mixture=[{path: A, weight: 0.7}, {path: B, weight: 0.3}]"
        )
    from .data import read_meta

    return read_meta(d.path)


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

    from .data import read_meta
    from .data.corpus import BIN_DTYPES

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
