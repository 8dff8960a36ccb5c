"""From Hydra to the job: ``conf/`` composed with overrides, checked key by key, converted once.

``jobs/train.py`` gets its composed config from ``@hydra.main`` (Hydra's command line: run
directories, ``--cfg``, multirun); the CLI composes with ``compose``. Both turn it into the
``JobConfig`` with ``to_job``, the one conversion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from ..data.config import DataConfig
from ..model.config import ModelConfig
from .schema import ClusterConfig, JobConfig, LoggerConfig, ParallelConfig, TrainerConfig

if typing.TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str], conf_dir: str | Path | None = None) -> JobConfig:
    """The JobConfig that ``jobs/train.py`` runs with these overrides: Hydra's compose of
    ``conf/``, then ``to_job``, the one conversion both take."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir or CONF_DIR), version_base=None):
        return to_job(hydra_compose(config_name="config", overrides=list(overrides)))


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
    """The composed config as the JobConfig: the one conversion, for jobs/train.py and ``compose``.

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
