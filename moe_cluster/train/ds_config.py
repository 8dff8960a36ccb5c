"""DeepSpeed config reconciliation for ``trainer.engine=deepspeed``: pure functions, no engine.

The user's DeepSpeed config (the ``deepspeed`` section, over its ``config_path`` JSON) is merged
with the keys this service owns (batch sizes, accumulation, clipping) by ``resolve_config``; a key
that disagrees with ours is an error before any worker starts. DeepSpeed is imported only for its
``zero_optimization`` schema (typos and deprecated spellings are caught by DeepSpeed's own rules).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..parallel.layout import Layout
from .config import OptimConfig

ZERO_STAGES = (1, 2)
ADAM_TYPES = ("adam", "adamw")


def _plain(value):
    """Plain dicts and lists all the way down (Hydra hands over DictConfigs when not converted)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def user_config(section: Mapping | None) -> dict:
    """The DeepSpeed keys of a ``deepspeed`` config section.

    The section holds DeepSpeed's own keys, and optionally ``config_path``, a DeepSpeed JSON file
    they are merged over. ``config`` is also understood: a JSON path, or a mapping of DeepSpeed
    keys (the section's own keys win over it).
    """
    section = _plain(section or {})
    path = section.pop("config_path", None)
    nested = section.pop("config", None)
    if isinstance(nested, str):
        if path and path != nested:
            raise ValueError(
                f"deepspeed.config_path={path!r} and deepspeed.config={nested!r} name two JSON files; give one"
            )
        path = nested
    elif nested is not None:
        if not isinstance(nested, dict):
            raise ValueError(f"deepspeed.config must be a JSON path or a mapping of DeepSpeed keys, got {nested!r}")
        section = _merge(nested, section)
    return load_user_config(path, section)


def load_user_config(config_path: str | None, overrides: Mapping | None) -> dict:
    """The JSON at ``config_path`` (if any) with ``overrides`` merged over it, key by key."""
    base: dict = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"deepspeed.config_path={config_path!r} does not exist; give the path of a DeepSpeed JSON config")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"deepspeed.config_path={config_path!r} is not valid JSON: {exc}") from None
        if not isinstance(base, dict):
            raise ValueError(f"deepspeed.config_path={config_path!r} must hold a JSON object, got {type(base).__name__}")
    return _merge(base, _plain(overrides or {}))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _agree(ds: dict, key: str, ours, our_key: str, where: str = "") -> None:
    """``ds[key]`` may be absent or "auto" (then it takes ours), or must equal ours."""
    value = ds.get(key, "auto")
    if value == "auto":
        ds[key] = ours
        return
    if isinstance(ours, float) or isinstance(value, float):
        same = isinstance(value, (int, float)) and abs(float(value) - float(ours)) <= 1e-12 * max(1.0, abs(ours))
    else:
        same = value == ours
    if not same:
        raise ValueError(
            f"the DeepSpeed config sets {where}{key}={value!r} but {our_key}={ours!r}; "
            f"remove {where}{key} from the DeepSpeed config (or set it to \"auto\"), or set {our_key}={value!r}"
        )


def resolve_config(user: dict, layout: Layout, optim: OptimConfig) -> dict:
    """The config DeepSpeed runs with: ``user`` plus the keys we own (from ``layout``, whose global
    batch splits evenly by construction); conflicts raise ``ValueError``."""
    ds = _plain(user)
    for key in ("zero_optimization", "optimizer", "scheduler", "fp16", "bf16"):
        if key in ds and not isinstance(ds[key], dict):
            raise ValueError(f"{key} in the DeepSpeed config must be an object, got {ds[key]!r}")
    _agree(ds, "train_batch_size", layout.global_batch_size, "trainer.global_batch_size")
    _agree(ds, "train_micro_batch_size_per_gpu", layout.micro_batch,
           "trainer.global_batch_size / (cluster.num_workers x trainer.grad_accum)")  # fmt: skip
    _agree(ds, "gradient_accumulation_steps", layout.grad_accum, "trainer.grad_accum")
    _agree(ds, "gradient_clipping", float(optim.grad_clip), "trainer.optim.grad_clip")

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 1)
    if stage == 3:
        raise ValueError(
            "zero_optimization.stage=3 is refused: DeepSpeed does not support its MoE expert parameters under "
            "ZeRO stage 3; use zero_optimization.stage=1 or 2"
        )
    if stage not in ZERO_STAGES:
        raise ValueError(
            f"zero_optimization.stage={stage!r} is not supported by trainer.engine=deepspeed; use 1 or 2 "
            f"(or trainer.engine=native for plain data parallelism)"
        )

    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", False) not in (False, "auto"):
            raise ValueError(
                f"{key}.enabled=true in the DeepSpeed config is not supported: precision is the engine's own "
                f"(fp32 master weights; bf16 autocast on GPU, as with the native engine). Remove the {key} section"
            )
        ds.pop(key, None)
    # DeepSpeed's own schema for the section: unknown keys (typos) and bad values fail here,
    # before any worker starts, and deprecated spellings (cpu_offload) are resolved.
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        parsed = DeepSpeedZeroConfig(**zero)
    except ValueError as exc:  # pydantic's ValidationError is one
        errors = getattr(exc, "errors", None)
        detail = "; ".join(
            f"zero_optimization.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors()
        ) if errors else str(exc)  # fmt: skip
        raise ValueError(f"the DeepSpeed config's zero_optimization is invalid: {detail}") from None
    for key in ("offload_optimizer", "offload_param"):
        section = getattr(parsed, key)
        if section is not None and str(getattr(section.device, "value", section.device)) != "none":
            raise ValueError(
                f"zero_optimization.{key} (device {section.device!r}) is not supported by trainer.engine=deepspeed "
                f"(the engine steps torch's AdamW on the workers' own devices); remove it"
            )
    scheduler = ds.pop("scheduler", None)
    params = (scheduler or {}).get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"scheduler.params in the DeepSpeed config must be an object, got {params!r}")
    if scheduler is not None and (not params or any(v != "auto" for v in params.values())):
        raise ValueError(
            "the DeepSpeed config has a 'scheduler' section, but the learning-rate schedule is trainer.optim's "
            "(linear warmup, cosine decay: trainer.optim.lr, min_lr, warmup_steps, decay_steps); remove 'scheduler' "
            "(a section whose params are all \"auto\" is accepted and means the same)"
        )
    if "optimizer" in ds:
        _check_optimizer(ds.pop("optimizer"), optim)
    return ds


def _check_optimizer(section: dict, optim: OptimConfig) -> None:
    """An ``optimizer`` section is accepted when it says what trainer.optim says (AdamW)."""
    kind = str(section.get("type", "")).lower()
    if kind not in ADAM_TYPES:
        raise ValueError(
            f"the DeepSpeed config's optimizer.type={section.get('type')!r} is not supported: the engine runs "
            f"AdamW configured by trainer.optim; remove the 'optimizer' section"
        )
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"optimizer.params in the DeepSpeed config must be an object, got {params!r}")
    params = dict(params)
    betas = params.pop("betas", "auto")
    if betas != "auto":
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"the DeepSpeed config's optimizer.params.betas={betas!r} must have two entries")
        params["beta1"], params["beta2"] = betas
    for key in ("lr", "weight_decay", "eps", "beta1", "beta2"):
        if key in params:
            probe = {key: params.pop(key)}
            _agree(probe, key, float(getattr(optim, key)), f"trainer.optim.{key}", where="optimizer.params.")
    if params.pop("adam_w_mode", True) is False:
        raise ValueError(
            "the DeepSpeed config's optimizer.params.adam_w_mode=false asks for Adam with L2 regularisation; "
            "the engine runs AdamW (decoupled weight decay); remove adam_w_mode"
        )
    params.pop("torch_adam", None)  # which implementation runs AdamW: ours is torch's in any case
    if params:
        raise ValueError(
            f"the DeepSpeed config's optimizer.params has keys the engine does not take: {sorted(params)}; "
            f"the optimizer is configured by trainer.optim"
        )
