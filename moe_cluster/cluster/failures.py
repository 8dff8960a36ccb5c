"""What went wrong, and what it leads to: failures classified from the exceptions that reported
them, and the failure policy.

Pure: no Ray calls here (Ray's exception *types* are read, nothing is waited on or fetched), so
every rule is tested on plain values. The exceptions the controller and the worker group raise to
name a failure they found (``Hang``, ``Lost``, ``CapacityError``) are defined here, beside the
rules that read them.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

import torch
from ray.exceptions import OutOfMemoryError as RayOutOfMemoryError
from ray.exceptions import RayActorError, RayTaskError

from ..train import checkpoint
from ..train.step import Diverged


class JobFailed(RuntimeError):
    """The job stopped for good; the message summarises why, and what is kept."""


class CapacityError(RuntimeError):
    """The cluster could not place every worker within the capacity timeout."""


class Hang(RuntimeError):
    """No result within the step timeout; ``ranks`` are the ones that stopped answering."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class Lost(RuntimeError):
    """A worker process (or its node) is gone; ``ranks`` are the ones found dead."""

    def __init__(self, cause: Exception, ranks: list[int]):
        super().__init__(f"rank(s) {ranks} died: {cause}" if ranks else str(cause))
        self.ranks = ranks


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
# Failures the survivors can heal from peers' memory (trainer.recovery=peers): a rank is gone or stuck.
HEALABLE = frozenset({FailureKind.ACTOR_DIED, FailureKind.HANG, FailureKind.EXCEPTION})


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


# errno values of a disk that is full or refuses writes: a replay would meet them again. A save's
# errors are told by their type (checkpoint.CheckpointWriteError); elsewhere only a full or
# read-only disk is that sure (an EACCES while reading data, say, is not the checkpoint disk's).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

STORAGE_HINT = (
    "The checkpoint disk is full or refuses writes, and a replay would fail alike: free space there, lower "
    "trainer.keep_checkpoints, or set trainer.checkpoint_dir to another disk, then relaunch with resume=true"
)
FULL_HINT = "A disk a worker writes to is full or read-only, and a replay would fail alike: free space there"

OUT_OF_MEMORY_HINT = (
    "a worker ran out of memory; a replay would too, so it is not retried. See the job's memory per rank with "
    "`moe-cluster plan <the job's overrides>` (docs/scaling.md) and make it fit: parallel.fsdp=true, "
    "model.activation_checkpointing=full or selective, more workers, a larger parallel.ep, a shorter trainer.seq_len"
)


def classify(exc: Exception, step: int) -> Failure:
    """The failure ``exc`` reports, ``step`` being the last step every rank completed."""
    if isinstance(exc, Hang):
        return Failure(FailureKind.HANG, str(exc), step, ranks=tuple(exc.ranks))
    if isinstance(exc, CapacityError):
        return Failure(FailureKind.CAPACITY, str(exc), step)
    if isinstance(exc, Lost):
        return Failure(FailureKind.ACTOR_DIED, str(exc), step, ranks=tuple(exc.ranks))
    if isinstance(exc, RayActorError):
        return Failure(FailureKind.ACTOR_DIED, str(exc), step)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, checkpoint.CheckpointCorrupt):
        return Failure(FailureKind.CORRUPT_CHECKPOINT, str(exc.cause), step, checkpoint=exc.cause.path)
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, (Diverged, checkpoint.NonFiniteState)):
        return Failure(FailureKind.DIVERGED, f"{cause}\n{exc}", step)
    if isinstance(cause, checkpoint.CheckpointWriteError) and cause.errno in STORAGE_ERRNOS:
        return Failure(FailureKind.STORAGE, f"{cause_line(exc)}. {STORAGE_HINT}\n{exc}", step)
    if isinstance(cause, OSError) and cause.errno in FULL_ERRNOS:  # a disk the job writes elsewhere (/dev/shm, say)
        return Failure(FailureKind.STORAGE, f"{cause_line(exc)}. {FULL_HINT}\n{exc}", step)
    # Ray's memory monitor killed a task, or a worker's allocation failed.
    if isinstance(exc, RayOutOfMemoryError) or (isinstance(exc, RayTaskError) and is_allocation_failure(exc.cause)):
        what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
        return Failure(FailureKind.OUT_OF_MEMORY, f"{OUT_OF_MEMORY_HINT} ({what})\n{exc}", step)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, ValueError):
        return Failure(FailureKind.INVALID, str(exc.cause), step)
    if isinstance(exc, RayTaskError):
        # A peer's death often surfaces first as a collective error on the survivors. The first
        # line names the worker's own error; Ray's report (with the traceback) follows.
        return Failure(FailureKind.EXCEPTION, f"{cause_line(exc)}\n{exc}", step)
    return Failure(FailureKind.EXCEPTION, f"{type(exc).__name__}: {exc}", step)


def cause_line(exc: BaseException) -> str:
    """The error a worker raised, in one line: its type and message, not Ray's wrapper around it."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text[:500]}"


def is_allocation_failure(exc: BaseException | None) -> bool:
    """A failed allocation: Python's MemoryError, torch's (CUDA) OutOfMemoryError, or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "CUDA out of memory")
    )
