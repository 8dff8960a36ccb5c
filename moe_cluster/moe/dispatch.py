"""Expert-parallel dispatch: grouped rows travel to the ranks that own their experts and back.

Within an EP group of P ranks, rank p owns experts [p*L, (p+1)*L) (L = E / P). A rank's grouped
rows are ordered by global expert, so the rows for each destination rank are one contiguous run.

    counts_E ---all-to-all---> recv_PL     (rows each source rank sends me, per local expert)
    x_RD     ---all-to-all---> x_recv      (source-major: [p][l] blocks)
             --regroup-->      x_local     (local-expert-major: [l][p] blocks)
             --expert MLPs--> --regroup back--> --all-to-all back--> out_RD

Both all-to-alls and the regroup are autograd-aware: their backward is the same movement in
reverse. The row counts must reach the host (they size the all-to-all), one sync per layer.

Legend: R grouped rows on this rank, E global experts, P EP ranks, L local experts, D dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


# The collectives go through the functional ops (``_c10d_functional``): out of place, so that
# selective activation checkpointing (moe_cluster.parallel.checkpointing) can keep their outputs
# and hand them back when a block is recomputed, with no communication in backward. The in-place
# ``dist.all_to_all_single`` writes into a buffer the recompute would leave unfilled.


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """``dist.all_to_all_single`` returning a new tensor: ``in_splits[p]`` rows of ``x`` go to rank p."""
    out = torch.ops._c10d_functional.all_to_all_single(x.contiguous(), out_splits, in_splits, group.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``dist.all_reduce`` (sum) returning a new tensor; ``x`` is left as it was."""
    out = torch.ops._c10d_functional.all_reduce(x, "sum", group.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


class _Permute(torch.autograd.Function):
    """Rows reordered by a permutation; the backward is the inverse permutation (a gather)."""

    @staticmethod
    def forward(ctx, x, perm):
        ctx.save_for_backward(perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (perm,) = ctx.saved_tensors
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return grad.index_select(0, inverse), None


def source_to_expert_order(recv_PL: torch.Tensor) -> torch.Tensor:
    """Permutation taking rows from source-major ([p][l] blocks) to local-expert-major ([l][p])."""
    P, L = recv_PL.shape
    sizes_src = recv_PL.reshape(-1)
    start_src = torch.cumsum(sizes_src, 0) - sizes_src
    sizes_tgt = recv_PL.t().reshape(-1)
    start_src_in_tgt_order = start_src.view(P, L).t().reshape(-1)
    start_tgt = torch.cumsum(sizes_tgt, 0) - sizes_tgt
    block = torch.repeat_interleave(torch.arange(P * L, device=recv_PL.device), sizes_tgt)
    offset = torch.arange(block.numel(), device=recv_PL.device) - start_tgt[block]
    return start_src_in_tgt_order[block] + offset


@dataclass
class ExpertParallel:
    """How one MoE layer talks to its peers; set by ``moe_cluster.parallel.apply_expert_parallel``."""

    num_experts: int  # global E
    ep_size: int  # P
    ep_rank: int
    ep_group: dist.ProcessGroup | None  # None when ep_size == 1
    data_group: dist.ProcessGroup | None  # all data-parallel ranks (the world); None alone
    data_world_size: int = 1  # ranks in data_group (each reads an equal share of the batch)

    @property
    def local_experts(self) -> range:
        per_rank = self.num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def global_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Per-expert counts summed over every data-parallel rank (for balancing and logging)."""
        if self.data_group is None:
            return counts_E
        return all_reduce_sum(counts_E, self.data_group)

    def run_experts(self, x_RD, counts_E, experts, backend: str) -> torch.Tensor:
        """Send grouped rows to their experts' owners, run the local experts, bring results back."""
        P, L = self.ep_size, self.num_experts // self.ep_size
        used = int(counts_E.sum())
        send_PL = counts_E.view(P, L)
        recv_PL = all_to_all(send_PL.reshape(-1), [L] * P, [L] * P, self.ep_group).view(P, L)
        send, recv = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_recv = _AllToAll.apply(x_RD[:used], recv, send, self.ep_group)
        perm = source_to_expert_order(recv_PL)
        x_local = _Permute.apply(x_recv, perm)
        out_local = experts(x_local, recv_PL.sum(0), padded=False, backend=backend)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        out_recv = _Permute.apply(out_local, inverse)
        out_used = _AllToAll.apply(out_recv, send, recv, self.ep_group)
        if used == x_RD.shape[0]:
            return out_used
        # Capacity padding rows (past the kept rows) never travelled; they stay zero.
        return torch.cat([out_used, out_used.new_zeros(x_RD.shape[0] - used, out_used.shape[1])])
