"""The Ray side: TrainWorker actors, the WorkerGroup, the Controller, its states and policies.

    controller.py  the state machine that drives the job (states.py: its states and transitions)
    failures.py    failures classified from exceptions, and the failure policy (pure)
    policy.py      chunk sizes, layouts, rank assignment, lost ranks, snapshot sources (pure)
    heal.py        recovery from peers' memory: commits, spares, re-forms, grow back
    group.py       the WorkerGroup: the actors in one placement group, driven together
    worker.py      TrainWorker: one rank
    runlog.py      metrics.jsonl, events.jsonl and the observers
"""

from .controller import Controller
from .failures import CapacityError, Decision, Failure, FailureKind, JobFailed, on_failure
from .group import WorkerGroup
from .policy import next_chunk
from .states import State
from .worker import TrainWorker

__all__ = [
    "CapacityError",
    "Controller",
    "Decision",
    "Failure",
    "FailureKind",
    "JobFailed",
    "State",
    "TrainWorker",
    "WorkerGroup",
    "next_chunk",
    "on_failure",
]
