"""The Ray side: TrainWorker actors, the WorkerGroup, the Controller and its policies."""

from .controller import Controller, JobFailed
from .group import CapacityError, WorkerGroup
from .policy import Decision, Failure, FailureKind, State, next_chunk, on_failure
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
