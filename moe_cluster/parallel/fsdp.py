"""Sharded training state: FSDP2 (``fully_shard``) over the dense mesh and the expert mesh.

Applied after ``apply_expert_parallel``, on a model whose tensors are materialised:

- every block, and the root (embedding, final norm, head), is sharded over all ranks: a dense
  parameter, its gradient and its AdamW moments live 1/world on each rank;
- each MoE layer's experts, already split over the EP group, are sharded again over their
  expert-data-parallel group (the world/ep ranks that hold the same expert slice), as torchtitan
  does (``dp_shard_mod_ep``). So an expert tensor too lives 1/world on each rank. They are split
  on the expert dim when the local experts divide evenly over that group, else on the next dim
  (Mixtral's 8 experts at ep=8 on 16 ranks: one expert per EP rank, halved by its rows);
- when world == ep the expert group is one rank: experts stay plain local tensors, outside FSDP.

Gradients come out as one process holding the whole batch would have them (see apply.py): a dense
gradient is the sum over the world / world, FSDP's default mean. An expert gradient is the sum
over the expert-data-parallel group / world, not FSDP's default mean over that group (ep times
too large): its divide factor is set to the world size, which on gloo also needs sum reductions
(gloo has no PREMUL_SUM).

On GPU, compute is bf16 with fp32 master weights and fp32 gradient reduction; each block prefetches
the next block's all-gather explicitly, since the EP all-to-all's host syncs (row counts) stall
FSDP's implicit prefetch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from ..moe import MoELayer
from .mesh import ProcessGroups


def expert_shard_dim(local_experts: int, expert_dp: int) -> int:
    """Shard experts by whole experts when they divide evenly over the group, else by rows."""
    return 0 if local_experts % expert_dp == 0 else 1


def _mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # CPU: fp32 throughout


def apply_fsdp(model: nn.Module, groups: ProcessGroups) -> None:
    """Shard ``model`` (a Transformer after ``apply_expert_parallel``) in place. Collective."""
    layout = groups.layout
    if groups.world is None:
        raise ValueError("FSDP needs more than one rank; set parallel.fsdp=false for a single rank")
    device = next(model.parameters()).device
    mesh_device = device.type if device.type != "meta" else "cpu"
    mp = _mixed_precision(device)
    # Meshes over the process groups the layout already made: no new groups, and recovery's
    # abort of those groups reaches FSDP's collectives too.
    world_mesh = DeviceMesh.from_group(groups.world, mesh_device)
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    ignored: set[nn.Parameter] = set()
    if groups.expert_dp is not None:
        expert_mesh = DeviceMesh.from_group(groups.expert_dp, mesh_device)
        dim = expert_shard_dim(layout.experts_per_rank, layout.expert_dp)
        gloo = dist.get_backend(groups.expert_dp) == "gloo"
        for layer in moe_layers:
            fully_shard(layer.experts, mesh=expert_mesh, mp_policy=mp, shard_placement_fn=lambda _p: Shard(dim))
            register_fsdp_forward_method(layer.experts, "routed")  # the fused path calls this, not forward
            layer.experts.set_gradient_divide_factor(float(layout.world))
            if gloo:
                layer.experts.set_force_sum_reduction_for_comms(True)
    else:
        ignored = {p for layer in moe_layers for p in layer.experts.parameters()}
    blocks = list(model.blocks)
    for block in blocks:
        fully_shard(block, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
    if device.type == "cuda":
        for block, following in zip(blocks, blocks[1:]):
            nxt = [following] + [m for m in following.modules() if m is not following and isinstance(m, FSDPModule)]
            block.set_modules_to_forward_prefetch(nxt)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free every gathered weight, so the model's parameters are its shards again.

    Backward does it; a forward alone (evaluation) leaves the root's weights gathered, and
    checkpoints, snapshots and the optimizer must see the shards.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def on_current_mesh(t: DTensor, meshes: dict) -> DTensor:
    """``t`` on a mesh that places this rank where its process group does (same local tensor).

    A DTensor's mesh can be swapped by DTensor's sharding-propagation cache for an equal-comparing
    mesh over the same ranks (the cache keys on ranks, not on this process's place in them). In a
    worker that re-formed its process group in place (recovery from peers), that was a mesh of its
    earlier group, with the coordinate of the rank it had there: checkpoint shards then went to
    another rank's offsets (training is unaffected: FSDP keeps its own mesh). ``meshes`` caches
    one fresh mesh per group over a call.
    """
    group = t.device_mesh.get_group()
    mesh = meshes.get(group.group_name)
    if mesh is None:
        mesh = meshes[group.group_name] = DeviceMesh.from_group(group, t.device_mesh.device_type)
    if t.device_mesh.get_coordinate() == mesh.get_coordinate():
        return t
    return DTensor.from_local(t.to_local(), mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


def shard_offset(t: DTensor) -> tuple[int, int]:
    """(dim, offset) of this rank's piece of a DTensor sharded on a 1-D mesh (FSDP's chunks)."""
    (placement,) = t.placements
    if not isinstance(placement, Shard):
        raise ValueError(f"expected a sharded DTensor, got placements {t.placements}")
    n, k = t.device_mesh.size(), t.device_mesh.get_local_rank()
    size = -(-t.shape[placement.dim] // n)  # torch.chunk's chunk size
    return placement.dim, min(k * size, t.shape[placement.dim])
