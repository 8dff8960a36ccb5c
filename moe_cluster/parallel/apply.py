"""Parallelism applied to a single-device model from outside, in one documented order.

1. ``apply_expert_parallel``: each MoE layer keeps only this rank's slice of the experts and
   learns its peers (EP all-to-all, data-parallel counts).
2. ``sync_gradients`` after backward: every gradient is summed over the ranks that hold a copy
   of its parameter and divided by the world size (see below).
3. ``clip_grad_norm`` with the true global norm over all shards, then the optimizer step.

Why "sum over replicas / world size": each rank's loss is the mean over its own tokens, and the
global loss is the mean of the ranks' losses. A dense parameter's gradient is then the world
mean of the local gradients. An expert's gradient on its owner already sums the contributions
of every rank in its EP group (they came back through the all-to-all), so summing over the
expert-data-parallel replicas covers every rank once, and dividing by the world size gives the
global mean too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..moe import ExpertParallel, MoELayer
from .mesh import ProcessGroups

EXPERT_PARAM_SUFFIXES = ("experts.w_up", "experts.w_down")


def is_expert_param(name: str) -> bool:
    return name.endswith(EXPERT_PARAM_SUFFIXES)


def apply_expert_parallel(model: nn.Module, groups: ProcessGroups) -> None:
    """Shard every MoE layer's experts over the EP group (in place). Call before the optimizer."""
    layout = groups.layout
    local = layout.local_experts(groups.rank)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        if layer.num_experts != layout.num_experts:
            raise ValueError(f"an MoE layer has {layer.num_experts} experts but the layout expects {layout.num_experts}")
        experts = layer.experts
        if layout.ep > 1:
            experts.w_up = nn.Parameter(experts.w_up.detach()[local.start : local.stop].clone())
            experts.w_down = nn.Parameter(experts.w_down.detach()[local.start : local.stop].clone())
        layer.parallel = ExpertParallel(
            num_experts=layout.num_experts,
            ep_size=layout.ep,
            ep_rank=layout.ep_rank(groups.rank),
            ep_group=groups.ep,
            data_group=groups.world,
            data_world_size=layout.world,
        )


def _flat_all_reduce(grads: list[torch.Tensor], group, scale: float) -> None:
    if not grads:
        return
    if group is None:  # nothing to reduce: scale in place rather than copy into one flat buffer
        for g in grads:
            g.mul_(scale)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_gradients(model: nn.Module, groups: ProcessGroups) -> None:
    """Average gradients as one process holding the whole batch would have them (see module doc).

    Parameters sharded by FSDP (DTensors) were reduced by FSDP in backward; the rest are here.
    """
    dense, expert = [], []
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a parameter unused on this rank still joins the reduce
        (expert if is_expert_param(name) else dense).append(p.grad)
    scale = 1.0 / groups.layout.world
    _flat_all_reduce(dense, groups.world, scale)
    _flat_all_reduce(expert, groups.expert_dp, scale)


def clip_grad_norm(model: nn.Module, groups: ProcessGroups, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` by the global gradient norm over all shards; returns the norm before.

    After ``sync_gradients``: a plain dense gradient is identical everywhere, and a plain expert
    slice's gradient is identical across its replicas, so those count once per rank and once per
    EP group; FSDP shards (DTensors) partition their tensor over the ranks, so those count summed
    over the world.
    """
    device = next(model.parameters()).device  # NCCL reduces device tensors only
    dense_sq, expert_sq, sharded_sq = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            local = p.grad.to_local()
            sharded_sq += local.detach().double().pow(2).sum()
        else:
            local = p.grad
            sq = local.detach().double().pow(2).sum()
            if is_expert_param(name):
                expert_sq += sq
            else:
                dense_sq += sq
        grads.append(local)
    if groups.ep is not None:
        dist.all_reduce(expert_sq, group=groups.ep)
    if groups.world is not None and any(isinstance(p, DTensor) for p in model.parameters()):
        dist.all_reduce(sharded_sq, group=groups.world)
    norm = (dense_sq + expert_sq + sharded_sq).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm.float()
