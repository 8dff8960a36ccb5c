"""The parallel layout: world size and expert-parallel size, validated once, and its groups.

Ranks are laid out EP-major: EP group g holds ranks [g*ep, (g+1)*ep); rank r owns the expert
slice ``ep_rank = r % ep``. Every rank reads its own slice of the global batch (data parallel
over the whole world). The ranks that hold the same expert slice, {r : r % ep == i}, form that
slice's expert-data-parallel group.

    world=4, ep=2:   EP groups {0,1} {2,3}    expert-DP groups {0,2} {1,3}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    ep: int
    num_experts: int

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if self.ep < 1:
            raise ValueError(f"parallel.ep must be >= 1, got {self.ep}")
        if self.world_size % self.ep:
            raise ValueError(
                f"the world size {self.world_size} is not divisible by parallel.ep={self.ep}; "
                f"use a number of workers that is a multiple of {self.ep}, or change parallel.ep"
            )
        if self.num_experts % self.ep:
            raise ValueError(
                f"model.moe.num_experts={self.num_experts} is not divisible by parallel.ep={self.ep}; "
                f"choose parallel.ep among the divisors of {self.num_experts}"
            )

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def ep_group_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.ep
        return list(range(start, start + self.ep))

    def expert_dp_ranks(self, rank: int) -> list[int]:
        return list(range(rank % self.ep, self.world_size, self.ep))

    def local_experts(self, rank: int) -> range:
        first = self.ep_rank(rank) * self.experts_per_rank
        return range(first, first + self.experts_per_rank)


@dataclass
class ProcessGroups:
    """The process groups of one rank (None where the group is this rank alone)."""

    layout: ParallelLayout
    rank: int
    world: dist.ProcessGroup | None
    ep: dist.ProcessGroup | None
    expert_dp: dist.ProcessGroup | None


def build_process_groups(layout: ParallelLayout) -> ProcessGroups:
    """Create the EP and expert-DP groups. Collective: every rank must call it, in the same order."""
    if not dist.is_initialized():
        if layout.world_size != 1:
            raise ValueError(f"torch.distributed is not initialised but the layout has {layout.world_size} ranks")
        return ProcessGroups(layout, 0, None, None, None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(f"the process group has {world} ranks but the layout expects {layout.world_size}")
    ep_group = expert_dp_group = None
    # new_group is collective over the whole world: every rank creates every group, keeps its own.
    for start in range(0, world, layout.ep):
        g = dist.new_group(list(range(start, start + layout.ep)))
        if start <= rank < start + layout.ep:
            ep_group = g
    for i in range(layout.ep):
        g = dist.new_group(list(range(i, world, layout.ep)))
        if rank % layout.ep == i:
            expert_dp_group = g
    return ProcessGroups(
        layout,
        rank,
        dist.group.WORLD if world > 1 else None,
        ep_group if layout.ep > 1 else None,
        expert_dp_group if world // layout.ep > 1 else None,
    )
