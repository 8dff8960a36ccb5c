"""The job's configuration: schemas, composition from ``conf/``, assembly, validation.

    schema.py    the dataclasses Hydra fills in (data only: no torch)
    compose.py   conf/ + overrides -> JobConfig (``compose``, ``to_job``: unknown keys refused)
    assemble.py  the files the job names read once on the driver; the job's ``Layout``
    validate.py  small pure checks: ranges, choices, shape, files, resources

The memory plan is the planner's (``moe_cluster.plan.check_memory``), called by the launcher and
``moe-cluster plan``.
"""

from .assemble import assemble, data_vocab, deepspeed_user_config, job_layout
from .compose import CONF_DIR, compose, register_configs, schema_keys, to_job, unknown_keys
from .schema import (
    PLACEMENT_STRATEGIES, RECOVERY_MODES, WANDB_MODES, ClusterConfig, JobConfig, LoggerConfig, ParallelConfig,
    TrainerConfig, WandbConfig,
)  # fmt: skip
from .validate import (
    check_choices, check_files, check_model_choices, check_ranges, check_resources, check_shape, job_choices,
    job_rules, raise_unknown_choice, validate,
)  # fmt: skip

# The sections' own schemas, where a JobConfig is built by hand.
from ..data.config import DataConfig, MixtureSource
from ..model.config import ModelConfig, MoEConfig
from ..train.config import OptimConfig, TrainConfig

__all__ = [
    "CONF_DIR", "PLACEMENT_STRATEGIES", "RECOVERY_MODES", "WANDB_MODES", "ClusterConfig", "DataConfig", "JobConfig",
    "LoggerConfig", "MixtureSource", "ModelConfig", "MoEConfig", "OptimConfig", "ParallelConfig", "TrainConfig",
    "TrainerConfig", "WandbConfig", "assemble", "check_choices", "check_files", "check_model_choices", "check_ranges",
    "check_resources", "check_shape", "compose", "data_vocab", "deepspeed_user_config", "job_choices", "job_layout",
    "job_rules", "raise_unknown_choice", "register_configs", "schema_keys", "to_job", "unknown_keys", "validate",
]  # fmt: skip
