"""The DeepSpeed engine (``trainer.engine=deepspeed``): ZeRO stage 1 or 2 around our model.

What DeepSpeed does here: gradient reduction (dense parameters over the world, expert parameters
over their expert-data-parallel group), partitioning of the fp32 master weights and AdamW state
(ZeRO-1) and of the gradients (ZeRO-2), clipping, and the update. What stays ours: the model
and its expert-parallel all-to-all, the learning-rate schedule, the balancing losses and the
expert-bias update, and the checkpoint format.

Expert parameters are declared to DeepSpeed the way its own MoE layer declares them
(``param.allreduce = False`` and ``param.group_name = "ep_size_<ep>"``), and DeepSpeed's
expert-data-parallel groups are created for our EP size and checked against our layout, so
DeepSpeed reduces and shards each expert over exactly the ranks that hold it.

Checkpoints keep the native format: the ZeRO partitions are assembled into one tensor per
parameter (``safe_get_full_optimizer_state``) on save and split again on load. A checkpoint
written by either engine, at any EP size, resumes on either engine.

The user's DeepSpeed config (the ``deepspeed`` section, over its ``config_path`` JSON) is merged with
the keys this service owns (batch sizes, accumulation, clipping) by ``resolve_config``; a key that
disagrees with ours is an error before any worker starts.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import ProcessGroups, is_expert_param
from .optim import OptimConfig, lr_at, param_groups, set_lr
from .step import run_micro_batches, step_metrics, update_expert_bias

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


def resolve_config(user: dict, *, global_batch_size: int, grad_accum: int, world_size: int, optim: OptimConfig) -> dict:
    """The config DeepSpeed runs with: ``user`` plus the keys we own; conflicts raise ``ValueError``."""
    ds = _plain(user)
    for key in ("zero_optimization", "optimizer", "scheduler", "fp16", "bf16"):
        if key in ds and not isinstance(ds[key], dict):
            raise ValueError(f"{key} in the DeepSpeed config must be an object, got {ds[key]!r}")
    if global_batch_size % (world_size * grad_accum):
        raise ValueError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by {world_size} workers x "
            f"trainer.grad_accum={grad_accum}"
        )
    _agree(ds, "train_batch_size", global_batch_size, "trainer.global_batch_size")
    _agree(ds, "train_micro_batch_size_per_gpu", global_batch_size // (world_size * grad_accum),
           "trainer.global_batch_size / (cluster.num_workers x trainer.grad_accum)")  # fmt: skip
    _agree(ds, "gradient_accumulation_steps", grad_accum, "trainer.grad_accum")
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


def _declaration(num_experts: int, ep_size: int) -> nn.Module:
    # DeepSpeed turns on its MoE handling (expert gradient reduction, MoE optimizer groups) when
    # the model contains an instance of its MoE layer class; it reads ``num_experts`` and calls
    # ``set_deepspeed_parallelism``. Our layers do their own routing and all-to-all, so a
    # parameter-free stand-in of that class carries the declaration.
    from deepspeed.moe.layer import MoE

    class ExpertParallelDeclaration(MoE):
        """Stands for our MoE layers in DeepSpeed's eyes. Holds no parameters, never runs."""

        def __init__(self):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = f"ep_size_{ep_size}"
            self.num_local_experts = num_experts // ep_size

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are created (and checked against our layout) before initialize

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel declaration is not a layer; it is never called")

    return ExpertParallelDeclaration()


class _Declared(nn.Module):
    """What DeepSpeed wraps: our model, plus the declaration of its expert parallelism."""

    def __init__(self, model: nn.Module, declaration: nn.Module):
        super().__init__()
        self.model = model
        self.moe_declaration = declaration

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return self.model(tokens_BS)


def _create_expert_groups(groups: ProcessGroups) -> str:
    """DeepSpeed's expert and expert-data-parallel groups for our EP size, checked against ours."""
    from deepspeed.utils import groups as ds_groups

    layout = groups.layout
    name = f"ep_size_{layout.ep}"
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(layout.ep)
    rank = groups.rank
    theirs = (
        sorted(dist.get_process_group_ranks(ds_groups._get_expert_parallel_group(name))),
        sorted(dist.get_process_group_ranks(ds_groups._get_expert_data_parallel_group(name))),
    )
    ours = (layout.ep_group_ranks(rank), layout.expert_dp_ranks(rank))
    if theirs != ours:
        raise RuntimeError(
            f"DeepSpeed's expert groups {theirs} differ from the layout's {ours} on rank {rank}; "
            f"this DeepSpeed version lays out expert parallelism differently"
        )
    return name


def select_accelerator(device: torch.device) -> None:
    """Make DeepSpeed use ``device``'s kind; call before DeepSpeed is first imported.

    Otherwise it picks CUDA on any machine that has it, and moves CPU ranks' models there.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class DeepSpeedEngine:
    """One rank's DeepSpeed engine around an expert-parallel model (after ``apply_expert_parallel``)."""

    def __init__(self, model: nn.Module, groups: ProcessGroups, optim: OptimConfig, ds_config: dict):
        if not dist.is_initialized():
            raise ValueError(
                "trainer.engine=deepspeed needs a torch.distributed process group (the Ray service and "
                "moe_cluster.train.launch create one, also for a single rank)"
            )
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.model, self.groups, self.optim_cfg = model, groups, optim
        device = next(model.parameters()).device
        select_accelerator(device)
        # DeepSpeed picks its device from LOCAL_RANK. A TrainWorker sees its one GPU as device 0;
        # launchers that run several ranks per machine set LOCAL_RANK themselves.
        os.environ.setdefault("LOCAL_RANK", "0")
        # DeepSpeed's communication layer adopts the process group this rank already joined.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        group_name = _create_expert_groups(groups)
        for name, p in model.named_parameters():
            if is_expert_param(name):
                p.allreduce = False  # DeepSpeed's mark of an expert parameter
                p.group_name = group_name
        self.param_names = {p: n for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(
            split_params_into_different_moe_groups_for_optimizer(param_groups(model, optim)),
            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, foreach=False,
        )  # fmt: skip
        declared = _Declared(model, _declaration(groups.layout.num_experts, groups.layout.ep))
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=declared, optimizer=optimizer, config=ds_config, dist_init_required=False
            )
        except (AssertionError, ValueError) as exc:
            # DeepSpeed checks its config with asserts and pydantic; the same config fails the
            # same way on every restart, so it is reported as invalid input rather than retried.
            raise ValueError(f"DeepSpeed refused the configuration: {type(exc).__name__}: {exc}") from exc
        if next(model.parameters()).device != device:
            raise ValueError(
                f"DeepSpeed moved the model from {device} to {next(model.parameters()).device}; "
                f"set DS_ACCELERATOR to match the workers' device (cpu or cuda)"
            )

    def train_step(self, step: int, micro_batches, bias_update_rate: float = 0.0) -> dict:
        """Optimizer step ``step`` over this rank's micro-batches; metrics as the native step returns them."""
        lr = lr_at(step, self.optim_cfg)
        set_lr(self.optimizer, lr)

        def backward(loss):
            self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            self.engine.step()  # the update happens at the accumulation boundary only

        total, ce_total, counts = run_micro_batches(self.model, micro_batches, backward, forward=self.engine)
        update_expert_bias(self.model, counts, bias_update_rate)
        grad_norm = self.engine.get_global_grad_norm()  # the same on every rank
        device = next(self.model.parameters()).device  # NCCL reduces device tensors only
        grad_norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm), device=device)
        return step_metrics(total, ce_total, grad_norm, lr)

    # -- checkpoint state: assembled from, and split back into, the ZeRO partitions ----------

    def _link_optimizer_state(self) -> None:
        """Make every parameter's view into the AdamW state of its ZeRO partition current.

        ZeRO links these views once, right after the first parameter group's first update, so
        the groups updated after it (the expert group among them) would stay unlinked; and
        before any step there is no AdamW state at all (a resume), so it is created here.
        """
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.optimizer
        state = zero.optimizer.state
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            if not state[flat]:
                state[flat] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
            lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, state)
        zero._hp_optimizer_states_linked = True

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name: full ``exp_avg``, ``exp_avg_sq`` and ``step`` (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_optimizer_state()
        step = self._adam_step()
        out = {}
        for p, name in self.param_names.items():
            # One parameter's full state at a time on the device, then to host memory: the whole
            # unpartitioned state never sits on the accelerator.
            out[name] = {key: safe_get_full_optimizer_state(p, key).to("cpu", p.dtype) for key in ("exp_avg", "exp_avg_sq")}
            out[name]["step"] = step.clone()
        return out

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write loaded per-parameter state (and the loaded weights) into the ZeRO partitions."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._link_optimizer_state()
        steps = set()
        for p, name in self.param_names.items():
            safe_set_full_fp32_param(p, p.data.float())  # the master copy follows the loaded weights
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state[name][key].float(), key)
            steps.add(float(state[name]["step"]))
        if len(steps) != 1:
            raise ValueError(f"the checkpoint's AdamW step counts differ between parameters: {sorted(steps)}")
        # ZeRO keeps one AdamW state per flat partition; every parameter has taken the same steps.
        step = steps.pop()
        for s in self.optimizer.optimizer.state.values():
            s["step"] = torch.tensor(step, dtype=torch.float32) if torch.is_tensor(s["step"]) else int(step)

    def _adam_step(self) -> torch.Tensor:
        states = list(self.optimizer.optimizer.state.values())
        if not states:
            return torch.zeros((), dtype=torch.float32)
        return torch.as_tensor(states[0]["step"], dtype=torch.float32).clone()
