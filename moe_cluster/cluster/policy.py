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


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str
    step: int  # last step completed before the failure
    checkpoint: str | None = None  # the unreadable checkpoint, for CORRUPT_CHECKPOINT


class Decision(enum.Enum):
    RESTART = "restart"  # rebuild the worker group, resume from the latest checkpoint
    SET_ASIDE = "set_aside"  # move the unreadable checkpoint away, restart from the one before
    GIVE_UP = "give_up"


def on_failure(failure: Failure, failures_so_far: int, max_failures: int) -> Decision:
    """Restart while the failure budget lasts. Missing capacity is final (the wait for it had its
    own timeout), and so is invalid input (a replay would fail the same way). An unreadable
    checkpoint is set aside and costs no budget: retrying it cannot help, and each one set aside
    leaves one checkpoint fewer, so this ends (at worst in a start from scratch)."""
    if failure.kind in (FailureKind.CAPACITY, FailureKind.INVALID):
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
