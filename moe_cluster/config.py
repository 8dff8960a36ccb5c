"""The job's configuration: dataclass schemas registered in Hydra's ConfigStore, and validation.

Every key here is public (docs, CLI overrides and outside tools use them). The groups in
``conf/`` fill these schemas in; Hydra rejects unknown keys and wrong types, and ``validate``
checks what types cannot (divisibility, sizes, what the cluster can place) before any actor
starts, naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .model import ModelConfig
from .train import DataConfig, OptimConfig, TrainConfig
from .train.trainer import ENGINES


RECOVERY_MODES = ("peers", "checkpoint")


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
    """
    m = cfg.model
    m.validate()
    p, t, c = cfg.parallel, cfg.trainer, cfg.cluster
    if c.num_workers < 1:
        raise ValueError(f"cluster.num_workers must be >= 1, got {c.num_workers}")
    if p.ep < 1:
        raise ValueError(f"parallel.ep must be >= 1, got {p.ep}")
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
    for key, value, ok, rule in (
        ("max_steps", t.max_steps, t.max_steps >= 1, ">= 1"),
        ("grad_accum", t.grad_accum, t.grad_accum >= 1, ">= 1"),
        ("keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, ">= 1"),
        ("checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 0, ">= 0 (0: never)"),
        ("max_failures", t.max_failures, t.max_failures >= 0, ">= 0"),
        ("step_timeout_s", t.step_timeout_s, t.step_timeout_s > 0, "> 0"),
        ("capacity_timeout_s", t.capacity_timeout_s, t.capacity_timeout_s > 0, "> 0"),
        ("startup_grace_s", t.startup_grace_s, t.startup_grace_s >= 0, ">= 0"),
        ("snapshot_every", t.snapshot_every, t.snapshot_every >= 1, ">= 1"),
    ):
        if not ok:
            raise ValueError(f"trainer.{key} must be {rule}, got {value}")
    if t.global_batch_size % (c.num_workers * t.grad_accum):
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by cluster.num_workers="
            f"{c.num_workers} x trainer.grad_accum={t.grad_accum}"
        )
    if t.seq_len > m.max_seq_len:
        raise ValueError(f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.engine not in ENGINES:
        raise ValueError(f"trainer.engine={t.engine!r} is unknown; use one of: {', '.join(ENGINES)}")
    if t.engine == "deepspeed" and p.fsdp:
        raise ValueError(
            "parallel.fsdp=true shards the native engine's state; trainer.engine=deepspeed shards with ZeRO "
            "(the deepspeed section): set parallel.fsdp=false (or leave it unset), or trainer.engine=native"
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
    if cfg.logger.progress_every < 1:
        raise ValueError(f"logger.progress_every must be >= 1 (steps between progress lines), got {cfg.logger.progress_every}")
    if t.recovery not in RECOVERY_MODES:
        raise ValueError(f"trainer.recovery={t.recovery!r} is unknown; use one of: {', '.join(RECOVERY_MODES)}")
    if not 1 <= c.min_workers <= c.num_workers:
        raise ValueError(f"cluster.min_workers={c.min_workers} must be between 1 and cluster.num_workers={c.num_workers}")
    if c.resize_check_s < 0:
        raise ValueError(f"cluster.resize_check_s must be >= 0, got {c.resize_check_s}")
    if c.placement_strategy not in ("PACK", "SPREAD"):
        raise ValueError(f"cluster.placement_strategy={c.placement_strategy!r} is unknown; use PACK or SPREAD")
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


def _validate_memory(cfg: JobConfig, cluster_resources: dict | None, files: bool) -> None:
    """The plan against GPU memory, or a CPU worker's host memory where that is known: on a
    cluster's resources, ``cluster.memory_gb_per_worker``, or this machine when the job runs here
    (``files``: not ``moe-cluster submit`` on a laptop, for a cluster)."""
    if cfg.model.vocab_size is None:
        return  # the data's vocabulary: planned where the job runs, once assemble has read it
    for key in ("gpu_memory_gb", "memory_gb_per_worker"):
        value = getattr(cfg.cluster, key)
        if value is not None and not value > 0:
            raise ValueError(f"cluster.{key} must be > 0 (10^9 bytes), got {value}")
    from .plan import plan_job, refusal, runs_here

    here = files and runs_here(cfg)
    plan = plan_job(cfg, cluster_resources, here=here)
    if not plan.fits:
        raise ValueError(refusal(cfg, plan, cluster_resources, here=here))


def _validate_model_choices(m) -> None:
    """The string choices a worker would only reject while building its model."""
    from moe_kernels import ACTIVATIONS, BACKENDS

    from .moe.router import SCORE_FUNCTIONS

    for key, value, allowed in (
        ("model.moe.activation", m.moe.activation, ACTIVATIONS),
        ("model.moe.backend", m.moe.backend, BACKENDS),
        ("model.moe.router", m.moe.router, SCORE_FUNCTIONS),
    ):
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is unknown; use one of: {', '.join(allowed)}")


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
