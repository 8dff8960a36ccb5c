"""The job's configuration schemas: dataclasses that Hydra's ConfigStore holds (``compose.py``).

Data only: no torch, NumPy or Hydra, so the driver, ``moe-cluster submit`` and outside tools
load them anywhere. Every key here is public (docs, CLI overrides and outside tools use them).
Each default is the shipped default: the groups in ``conf/`` spell them out for reading, and
tests/test_config.py keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.config import DataConfig
from ..model.config import ModelConfig
from ..train.config import TrainConfig

RECOVERY_MODES = ("peers", "checkpoint")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD")
WANDB_MODES = ("online", "offline", "disabled")  # logger.wandb.mode, as wandb.init takes it


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
