"""The process groups of a ``Layout`` (layout.py): one EP group and one expert-data-parallel
group per rank, laid out as the layout says.

    world=4, ep=2:   EP groups {0,1} {2,3}    expert-DP groups {0,2} {1,3}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .layout import Layout


@dataclass
class ProcessGroups:
    """The process groups of one rank (None where the group is this rank alone)."""

    layout: Layout
    rank: int
    world: dist.ProcessGroup | None
    ep: dist.ProcessGroup | None
    expert_dp: dist.ProcessGroup | None


def build_process_groups(layout: Layout) -> ProcessGroups:
    """Create the EP and expert-DP groups. Collective: every rank must call it, in the same order."""
    if not dist.is_initialized():
        if layout.world != 1:
            raise ValueError(f"torch.distributed is not initialised but the layout has {layout.world} ranks")
        return ProcessGroups(layout, 0, None, None, None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != layout.world:
        raise ValueError(f"the process group has {world} ranks but the layout expects {layout.world}")
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
        expert_dp_group if layout.expert_dp > 1 else None,
    )
