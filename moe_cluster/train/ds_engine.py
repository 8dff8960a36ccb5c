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

The config DeepSpeed runs with comes from ``ds_config.resolve_config`` (pure, checked before any
worker starts). Every use of DeepSpeed's private internals (its expert-group registry, ZeRO's
partition bookkeeping) is in the last section of this module: the place to check on an upgrade.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import ProcessGroups, is_expert_param
from .optim import OptimConfig, lr_at, param_groups, set_lr
from .step import finite_everywhere, run_micro_batches, step_metrics, update_expert_bias


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
        grad_norm = self.engine.get_global_grad_norm()  # the same on every rank; None before the first boundary
        device = next(self.model.parameters()).device  # NCCL reduces device tensors only
        known = torch.zeros((), device=device) if grad_norm is None else torch.tensor(float(grad_norm), device=device)
        grad_norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm), device=device)
        metrics = step_metrics(total, ce_total, grad_norm, lr)
        # DeepSpeed's own step has run by now (engine.step at the accumulation boundary; in fp32 it
        # leaves out an update whose norm is not finite, docs/training.md): the Trainer stops the
        # run (nan_policy=skip is the native engine's), and no checkpoint holds this step.
        if not finite_everywhere(total, known):
            metrics["diverged"] = True
        return metrics

    # -- checkpoint state: assembled from, and split back into, the ZeRO partitions ----------

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name: full ``exp_avg``, ``exp_avg_sq`` and ``step`` (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        _link_optimizer_state(self.optimizer)
        step = _adam_step(self.optimizer)
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

        _link_optimizer_state(self.optimizer)
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
        for s in _adam_states(self.optimizer).values():
            s["step"] = torch.tensor(step, dtype=torch.float32) if torch.is_tensor(s["step"]) else int(step)


# -- DeepSpeed internals: every private access of this module, in one place --------------------


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


def _link_optimizer_state(zero) -> None:
    """Make every parameter's view into the AdamW state of its ZeRO partition current.

    ZeRO links these views once, right after the first parameter group's first update, so
    the groups updated after it (the expert group among them) would stay unlinked; and
    before any step there is no AdamW state at all (a resume), so it is created here.
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    state = _adam_states(zero)
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        if not state[flat]:
            state[flat] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, state)
    zero._hp_optimizer_states_linked = True


def _adam_states(zero) -> dict:
    """torch AdamW's per-tensor state inside ZeRO's optimizer (one entry per flat partition)."""
    return zero.optimizer.state


def _adam_step(zero) -> torch.Tensor:
    states = list(_adam_states(zero).values())
    if not states:
        return torch.zeros((), dtype=torch.float32)
    return torch.as_tensor(states[0]["step"], dtype=torch.float32).clone()
