"""Pure decisions of the controller: what a failure leads to, how many steps to run next.

No Ray here: these are plain functions of plain values, tested on their own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"


TRANSITIONS = {
    State.STARTING: {State.RUNNING, State.RECOVERING, State.FAILED},
    State.RUNNING: {State.RUNNING, State.RECOVERING, State.FINISHED, State.FAILED},
    State.RECOVERING: {State.RUNNING, State.RECOVERING, State.FAILED},
    State.FINISHED: set(),
    State.FAILED: set(),
}


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise RuntimeError(f"controller cannot go from {old.value} to {new.value}")


class FailureKind(enum.Enum):
    ACTOR_DIED = "actor_died"  # a worker process or its node is gone
    EXCEPTION = "exception"  # a step raised
    HANG = "hang"  # no result within the step timeout (a peer stuck in a collective)
    CAPACITY = "capacity"  # the cluster could not place the workers in time
    INVALID = "invalid"  # a worker rejected its input (ValueError): replaying cannot help
    CORRUPT_CHECKPOINT = "corrupt_checkpoint"  # the checkpoint to resume from cannot be read
    OUT_OF_MEMORY = "out_of_memory"  # a worker could not allocate memory: the same job fails alike
    DIVERGED = "diverged"  # a non-finite loss or gradient norm (trainer.nan_policy): a replay diverges alike
    STORAGE = "storage"  # the disk is full, read-only or not writable: a replay fails alike


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str
    step: int  # last step completed before the failure
    checkpoint: str | None = None  # the unreadable checkpoint, for CORRUPT_CHECKPOINT
    ranks: tuple[int, ...] = ()  # the workers found dead (ACTOR_DIED) or silent (HANG), when known


# Failures a replay of the same job would meet again: they end it at once, budget or not.
FINAL = frozenset(
    {FailureKind.CAPACITY, FailureKind.INVALID, FailureKind.OUT_OF_MEMORY, FailureKind.DIVERGED, FailureKind.STORAGE}
)


class Decision(enum.Enum):
    RESTART = "restart"  # rebuild the worker group, resume from the latest checkpoint
    SET_ASIDE = "set_aside"  # move the unreadable checkpoint away, restart from the one before
    GIVE_UP = "give_up"


def on_failure(failure: Failure, failures_so_far: int, max_failures: int) -> Decision:
    """Restart while the failure budget lasts. Missing capacity is final (the wait for it had its
    own timeout), and so are invalid input, a failed allocation (`moe-cluster plan` says what would
    fit), a diverged run and a full or read-only disk: a replay of the same job would fail the same
    way. An unreadable
    checkpoint is set aside and costs no budget: retrying it cannot help, and each one set aside
    leaves one checkpoint fewer, so this ends (at worst in a start from scratch)."""
    if failure.kind in FINAL:
        return Decision.GIVE_UP
    if failure.kind is FailureKind.CORRUPT_CHECKPOINT:
        return Decision.SET_ASIDE
    return Decision.RESTART if failures_so_far < max_failures else Decision.GIVE_UP


def next_chunk(step: int, max_steps: int, checkpoint_every: int, chunk_steps: int, just_recovered: bool) -> int:
    """Steps for the next call to the workers.

    Chunks end at checkpoint boundaries (a checkpoint is then the last thing a chunk does) and
    are short enough for live progress. Right after a recovery a single step runs, so that the
    recovery time (failure detected -> next step completed) is measured to the step.
    """
    remaining = max_steps - step
    if remaining <= 0:
        return 0
    n = 1 if just_recovered else min(chunk_steps, remaining)
    if checkpoint_every > 0:
        n = min(n, checkpoint_every - step % checkpoint_every)
    return max(1, n)


@dataclass(frozen=True)
class Layout:
    """A job's shape on some number of workers: the global batch is the same in every layout."""

    world: int  # ranks
    ep: int  # expert-parallel size
    grad_accum: int  # micro-batches per optimizer step on each rank


def choose_layout(
    available: int,
    *,
    target: int,
    ep: int,
    grad_accum: int,
    num_experts: int,
    global_batch_size: int,
    min_workers: int = 1,
    fits=None,
) -> Layout | None:
    """The layout to continue on with ``available`` workers, or None when no layout is allowed.

    The job was configured as (``target`` workers, ``ep``, ``grad_accum``). A layout is allowed when
    its world divides into EP groups (world % ep' == 0, num_experts % ep' == 0), it has at least
    ``min_workers`` ranks, the global batch splits evenly into world x grad_accum' micro-batches no
    larger than the configured ones (so activations still fit), and ``fits(world, ep)`` says the
    model state fits a rank (default: always). Among the allowed layouts: the most ranks (the most
    throughput), then the configured ep (experts need not move), then the largest ep (the least
    expert memory per rank), then the fewest micro-batches.
    """
    if target < 1 or ep < 1:
        raise ValueError(f"target={target} and ep={ep} must be >= 1")
    micro = global_batch_size // (target * grad_accum)  # the configured micro-batch, in sequences
    best = None
    for world in range(min(available, target), max(min_workers, 1) - 1, -1):
        for ep_ in sorted((e for e in range(1, world + 1) if world % e == 0 and num_experts % e == 0), reverse=True):
            if fits is not None and not fits(world, ep_):
                continue
            if global_batch_size % world:
                continue
            per_rank = global_batch_size // world
            accum = next((a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= micro), None)
            if accum is None:
                continue
            key = (world, ep_ == ep, ep_, -accum)
            if best is None or key > best[0]:
                best = (key, Layout(world, ep_, accum))
        if best is not None:
            return best[1]  # the most ranks wins; smaller worlds are not looked at
    return None


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
        slice_ = rank % new.ep

        def score(i):
            old_rank = members[i]
            same_slice = old_rank is not None and new.ep == old.ep and old_rank % old.ep == slice_
            return (same_slice, old_rank is not None, -i)

        best = max(free, key=score)
        free.remove(best)
        chosen.append(best)
    return chosen


def snapshot_sources(
    new_rank: int, new: Layout, own_old_rank: int | None, old: Layout, alive: set[int], num_experts: int,
    sharded: bool = False,
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
    per_old, per_new = num_experts // old.ep, num_experts // new.ep
    needed = {e // per_old for e in range(new_rank % new.ep * per_new, (new_rank % new.ep + 1) * per_new)}
    sources = [] if own_old_rank is None else [own_old_rank]
    have = set() if own_old_rank is None else {own_old_rank % old.ep}
    for slice_ in sorted(needed - have):
        holders = [r for r in range(old.world) if r % old.ep == slice_]
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
