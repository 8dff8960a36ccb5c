"""Pure decisions of the controller: how many steps to run next, which layout to continue on,
which ranks a heal replaces and where each new rank's state comes from.

No Ray here: these are plain functions of plain values, tested on their own (what a failure leads
to is ``failures.on_failure``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..parallel.layout import Layout


def next_chunk(
    step: int, max_steps: int, checkpoint_every: int, chunk_steps: int, just_recovered: bool,
    snapshot_every: int | None = None,
) -> int:  # fmt: skip
    """Steps for the next call to the workers.

    Chunks end at checkpoint boundaries (a checkpoint is then the last thing a chunk does) and
    are short enough for live progress. Right after a recovery a single step runs, so that the
    recovery time (failure detected -> next step completed) is measured to the step.
    ``snapshot_every`` (trainer.recovery=peers): a chunk ends in a commit of every rank's state,
    so no chunk is longer.
    """
    remaining = max_steps - step
    if remaining <= 0:
        return 0
    n = 1 if just_recovered else min(chunk_steps, remaining)
    if checkpoint_every > 0:
        n = min(n, checkpoint_every - step % checkpoint_every)
    n = max(1, n)
    return n if snapshot_every is None else min(n, snapshot_every)


def choose_layout(available: int, job: Layout, *, min_workers: int = 1, fits=None) -> Layout | None:
    """The layout to continue on with ``available`` workers, or None when no layout is allowed.

    ``job`` is the layout the job was configured with (``job.world`` workers, its ep and
    grad_accum); the result is ``job.resized(...)``. A layout is allowed when ``Layout`` accepts it
    (its world divides into EP groups, the experts over ep, the global batch over world x
    grad_accum: the rules live there), it has at least ``min_workers`` ranks, its micro-batches
    are no larger than the configured ones (so activations still fit), and ``fits(world, ep)`` says
    the model state fits a rank (default: always). Among the allowed layouts: the most ranks (the
    most throughput), then the configured ep (experts need not move), then the largest ep (the
    least expert memory per rank), then the fewest micro-batches.
    """
    micro = job.micro_batch  # the configured micro-batch, in sequences
    for world in range(min(available, job.world), max(min_workers, 1) - 1, -1):
        allowed = []
        for ep in range(1, world + 1):
            if fits is not None and not fits(world, ep):
                continue
            # The fewest micro-batches that keep each one no larger than the configured one.
            for accum in range(-(-job.global_batch_size // (world * micro)), job.global_batch_size // world + 1):
                layout = _allowed(job, world, ep, accum)
                if layout is not None:
                    allowed.append(layout)
                    break
        if allowed:  # the most ranks wins; smaller worlds are not looked at
            return max(allowed, key=lambda lay: (lay.ep == job.ep, lay.ep, -lay.grad_accum))
    return None


def _allowed(job: Layout, world: int, ep: int, grad_accum: int) -> Layout | None:
    try:
        return job.resized(world, ep, grad_accum)
    except ValueError:
        return None


def lost_ranks(named: Iterable[int], stuck: Iterable[int], silent: Iterable[int]) -> list[int]:
    """The ranks a heal replaces, from what was found after the lost ranks were killed: the ranks
    the failure ``named`` (found dead, or silent in a hang), those whose chunk call never ended
    (``stuck``: a survivor blocked in a collective holds nothing current) and those that do not
    answer a call (``silent``: dead, or stopped). Sorted; empty when nothing points at a rank."""
    return sorted(set(named) | set(stuck) | set(silent))


def assign_ranks(members: list[int | None], old: Layout, new: Layout) -> list[int]:
    """Which member becomes each rank of ``new``: indices into ``members``, whose entries are old
    ranks (survivors) or None (new workers, holding nothing).

    With the same ep, a rank goes to a survivor that already holds its expert slice, so that its
    experts need not move; then to any survivor (its dense state is current), then to a new worker.
    """
    if len(members) < new.world:
        raise ValueError(f"{len(members)} members cannot form {new.world} ranks")
    free = list(range(len(members)))
    chosen = []
    for rank in range(new.world):
        slice_ = new.ep_rank(rank)

        def score(i):
            old_rank = members[i]
            same_slice = old_rank is not None and new.ep == old.ep and old.ep_rank(old_rank) == slice_
            return (same_slice, old_rank is not None, -i)

        best = max(free, key=score)
        free.remove(best)
        chosen.append(best)
    return chosen


def snapshot_sources(
    new_rank: int, new: Layout, own_old_rank: int | None, old: Layout, alive: set[int], sharded: bool = False,
) -> list[int]:
    """Old ranks whose snapshots, merged in order, hold everything ``new_rank`` of ``new`` needs.

    The rank's own old snapshot first (its dense state and experts, on its own node); then, for
    each expert slice it lacks, one old rank holding that slice, a survivor's where there is one.
    ``sharded``: the old layout's state was sharded (FSDP), every old rank holding a piece of
    every tensor: all old ranks' snapshots, the own one first.
    """
    if sharded:
        own = [] if own_old_rank is None else [own_old_rank]
        return own + [r for r in range(old.world) if r != own_old_rank]
    needed = {old.ep_rank_of_expert(e) for e in new.local_experts(new_rank)}
    sources = [] if own_old_rank is None else [own_old_rank]
    have = set() if own_old_rank is None else {old.ep_rank(own_old_rank)}
    for slice_ in sorted(needed - have):
        holders = old.expert_dp_ranks(slice_)  # the old ranks holding that slice
        sources.append(min(holders, key=lambda r: (r not in alive, r)))
    if not sources:  # a new worker that needs no expert slice cannot happen (ep divides E), but be safe
        sources.append(min(alive) if alive else 0)
    return sources


def keepers(nodes: list[str]) -> list[int]:
    """For each rank, the rank that keeps the second copy of its state: the next rank (cyclically)
    on another node, so that losing a node never loses both copies; the next rank where every rank
    shares one node."""
    n = len(nodes)
    return [
        next(((w + k) % n for k in range(1, n) if nodes[(w + k) % n] != nodes[w]), (w + 1) % n) for w in range(n)
    ]
