"""The controller's states: frozen values that carry what their step needs, and the transitions
allowed between them (``TRANSITIONS``, checked by ``check_transition``; the diagram is in
controller.py). Pure: tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .failures import Failure

if TYPE_CHECKING:
    from ..parallel.layout import Layout
    from .heal import Chunk, Spare


@dataclass(frozen=True)
class Recovery:
    """A recovery to record once the first step after it completes (the ``recovered`` event)."""

    detected_at: float  # time.monotonic() when the failure was seen
    replayed_steps: int  # logged steps the job runs again
    source: str  # "peers" (survivors' memory) or "checkpoint"
    replaced: tuple[int, ...] = ()  # the ranks a heal from peers replaced


class State:
    name: ClassVar[str]
    terminal: ClassVar[bool] = False


@dataclass(frozen=True)
class Starting(State):
    """Place the workers, form the group, load the checkpoint to resume from (if any)."""

    name: ClassVar[str] = "starting"


@dataclass(frozen=True)
class Running(State):
    """Run the next chunk of steps. ``recovered``: the chunk is the first after a recovery (one
    step, measured). ``resized``: the group was just re-formed larger; its first chunk runs before
    the spares are looked at again."""

    name: ClassVar[str] = "running"
    recovered: Recovery | None = None
    resized: bool = False


@dataclass(frozen=True)
class Resizing(State):
    """Grow back: the ranks of the group and the spares that are up (``joining``) re-form as ``layout``."""

    name: ClassVar[str] = "resizing"
    layout: Layout
    joining: tuple[Spare, ...]


@dataclass(frozen=True)
class Healing(State):
    """Re-form the survivors of ``failure`` in place, state from peers' memory (trainer.recovery=peers).
    ``chunk``: the calls in flight when it struck."""

    name: ClassVar[str] = "healing"
    failure: Failure
    detected_at: float
    chunk: Chunk | None


@dataclass(frozen=True)
class Restarting(State):
    """Replace every worker and resume from the latest complete checkpoint."""

    name: ClassVar[str] = "restarting"
    failure: Failure
    detected_at: float


@dataclass(frozen=True)
class Done(State):
    name: ClassVar[str] = "done"
    terminal: ClassVar[bool] = True
    summary: dict


@dataclass(frozen=True)
class Failed(State):
    """The job stopped: the policy gave up on ``failure``, or the controller itself failed (None)."""

    name: ClassVar[str] = "failed"
    terminal: ClassVar[bool] = True
    summary: str
    failure: Failure | None = None


TRANSITIONS: dict[type[State], set[type[State]]] = {
    Starting: {Running, Restarting, Failed},
    Running: {Running, Resizing, Healing, Restarting, Done, Failed},
    Resizing: {Running, Healing, Restarting, Failed},
    Healing: {Running, Restarting, Failed},
    Restarting: {Running, Restarting, Failed},
    Done: set(),
    Failed: set(),
}


def check_transition(old: State, new: State) -> None:
    if type(new) not in TRANSITIONS[type(old)]:
        raise RuntimeError(f"controller cannot go from {old.name} to {new.name}")
