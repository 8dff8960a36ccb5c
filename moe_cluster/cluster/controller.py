"""The controller: drives the worker group through the job and through its failures.

An explicit state machine (``policy.State``); every decision is a pure function in ``policy``.

    STARTING --> RUNNING --> FINISHED
        |          |   ^
        v          v   |
      FAILED <-- RECOVERING

Recovery kills every worker (stuck survivors too), builds a new group, and resumes from the
latest complete checkpoint; the data sampler's state comes with it, so the replay reads exactly
the samples the lost steps read. ``metrics.jsonl`` keeps one line per step: on recovery it is
cut back to the checkpoint's step and the replayed steps are written again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..config import JobConfig
from ..train import checkpoint
from .group import CapacityError, WorkerGroup
from .policy import Decision, Failure, FailureKind, State, check_transition, next_chunk, on_failure


class JobFailed(RuntimeError):
    """The job stopped for good; the message summarises why, and what is kept."""


class RunLog:
    """metrics.jsonl (one line per step) and events.jsonl in the run directory."""

    def __init__(self, run_dir: Path):
        self.metrics_path, self.events_path = run_dir / "metrics.jsonl", run_dir / "events.jsonl"

    def _records(self) -> list[str]:
        """The log's lines, less a last line torn by a driver killed mid-write."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        if lines:
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()
        return lines

    def truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self._records() if json.loads(line)["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)

    def last_step(self) -> int:
        lines = self._records()
        return json.loads(lines[-1])["step"] if lines else 0

    def write_metrics(self, records: list[dict]) -> None:
        with self.metrics_path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def event(self, name: str, **fields) -> dict:
        record = {"time": time.time(), "event": name, **fields}
        with self.events_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


class Controller:
    def __init__(self, job: JobConfig, run_dir: str | Path, *, chunk_steps: int = 10, log=print):
        self.job, self.run_dir, self.chunk_steps, self.log = job, Path(run_dir), chunk_steps, log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = job.trainer.checkpoint_dir or str(self.run_dir / "checkpoints")
        self.runlog = RunLog(self.run_dir)
        self.state = State.STARTING
        self.group: WorkerGroup | None = None
        self.step = 0  # last step whose metrics are logged
        self.failures = 0
        self.recoveries: list[dict] = []
        self.on_metrics = []  # callbacks(step record) for progress displays and loggers
        self.on_event = []  # callbacks(event record): started, failure, recovered, finished, failed
        self.observer_errors: dict[str, int] = {}  # "on_metrics:Name" -> exceptions that callback raised
        self.set_aside: list[str] = []  # unreadable checkpoints moved out of the way

    def _event(self, name: str, **fields) -> None:
        self._notify("on_event", self.on_event, self.runlog.event(name, **fields))

    def _notify(self, kind: str, callbacks: list, record: dict) -> None:
        """Observers (progress, plots, wandb, Ray metrics) never stop the job: an exception in one
        is recorded as an ``observer_error`` event and the run goes on."""
        for callback in callbacks:
            try:
                callback(record)
            except Exception as exc:
                name = f"{kind}:{getattr(callback, '__qualname__', type(callback).__name__)}"
                n = self.observer_errors[name] = self.observer_errors.get(name, 0) + 1
                if n == 1 or n % 100 == 0:  # the first, then every 100th: an outage must not flood the log
                    message = f"{type(exc).__name__}: {exc}"[:1000]
                    self.runlog.event("observer_error", observer=name, count=n, message=message)
                    self.log(f"observer {name} failed ({n} time(s)); the job goes on: {message.splitlines()[0][:300]}")

    def _set(self, new: State) -> None:
        check_transition(self.state, new)
        self.state = new

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict:
        """Run the job to the end; returns a summary. Raises JobFailed when it gives up.

        Mistakes in what was asked (a checkpoint of another architecture, or one that would be
        overwritten) raise ValueError before anything starts.
        """
        latest = checkpoint.latest_checkpoint(self.checkpoint_dir)
        if latest and not self.job.resume:
            raise ValueError(
                f"{self.checkpoint_dir} already holds checkpoints of an earlier run; pass resume=true to "
                f"continue it, or choose a new run directory"
            )
        if latest:
            checkpoint.check_model_config(latest, self.job.model)
        try:
            return self._run()
        except JobFailed:
            raise
        except BaseException as exc:  # the controller itself failed (a bug, an interrupt): say so, free the workers
            if self.state not in (State.FINISHED, State.FAILED):
                self._abort(exc)
            raise

    def _run(self) -> dict:
        self._event("started", resume=self.job.resume)
        just_recovered, detected_at, lost_steps = False, None, 0
        try:
            self._start_group()
            self._set(State.RUNNING)
        except Exception as exc:  # the first start fails like any later one
            just_recovered, detected_at, lost_steps = self._handle(exc, time.monotonic())
        while self.step < self.job.trainer.max_steps:
            n = next_chunk(
                self.step, self.job.trainer.max_steps, self.job.trainer.checkpoint_every, self.chunk_steps, just_recovered
            )
            try:
                records = self._run_chunk(n, first=self.group.chunks_run == 0)
            except Exception as exc:
                just_recovered, detected_at, lost_steps = self._handle(exc, time.monotonic())
                continue
            if just_recovered:
                self._record_recovery(records[0], detected_at, lost_steps)
                just_recovered = False
            self._log(records)
        self._set(State.FINISHED)
        self.group.shutdown()
        summary = {
            "steps": self.step,
            "failures": self.failures,
            "recoveries": self.recoveries,
            "run_dir": str(self.run_dir),
            "checkpoint_dir": self.checkpoint_dir,
            "last_checkpoint": str(checkpoint.latest_checkpoint(self.checkpoint_dir)),
        }
        self._event("finished", **{k: v for k, v in summary.items() if k != "recoveries"})
        return summary

    def _abort(self, exc: BaseException) -> None:
        if self.group is not None:
            self.group.shutdown()
        self.state = State.FAILED
        reason = f"the controller stopped at step {self.step}: {type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"
        self._event("failed", step=self.step, reason=f"{reason}. {self._checkpoints_note()}")

    def _start_group(self) -> None:
        self.group = WorkerGroup(self.job, self.checkpoint_dir, self.chunk_steps, log=self.log)
        resumed = self.group.start(self._resume_point())
        # Steps after the checkpoint will be replayed: their lines go, the replay writes them again.
        self.runlog.truncate_after(resumed)
        self.step = resumed

    def _resume_point(self):
        """The newest complete checkpoint not past the last step in metrics.jsonl.

        Workers may have committed a checkpoint whose steps' metrics never reached the log (the
        driver or a worker died in between); resuming there would leave holes in the log, so the
        replay starts from an earlier checkpoint instead, and re-creates the later one. A run
        directory with no log yet (``resume=true`` with a shared ``trainer.checkpoint_dir``)
        resumes from the newest checkpoint.
        """
        while True:
            complete = checkpoint.complete_checkpoints(self.checkpoint_dir)
            if self.runlog.metrics_path.exists():
                last_logged = self.runlog.last_step()
                complete = [(step, path) for step, path in complete if step <= last_logged]
            # else: a new run directory resuming a shared checkpoint directory: its log starts there.
            if not complete:
                return None
            path = complete[-1][1]
            problem = checkpoint.verify(path)  # shard files present and whole: cheap, before any actor
            if problem is None:
                return str(path)
            self._set_checkpoint_aside(str(path), problem)

    def _set_checkpoint_aside(self, path: str, reason: str) -> None:
        moved = checkpoint.set_aside(path)
        self.set_aside.append(str(moved))
        self._event("checkpoint_set_aside", checkpoint=path, moved_to=str(moved), reason=reason[:1000])
        self.log(f"checkpoint {path} is unreadable ({reason[:300]}); moved to {moved}, resuming from the one before")

    def _checkpoints_note(self) -> str:
        latest = checkpoint.latest_checkpoint(self.checkpoint_dir)
        note = f"Latest complete checkpoint: {latest}." if latest else "No complete checkpoint was written."
        if self.set_aside:
            note += f" Set aside as unreadable: {', '.join(self.set_aside)}."
        return note

    def _run_chunk(self, n: int, first: bool) -> list[dict]:
        refs = self.group.run(n)
        timeout = self.job.trainer.step_timeout_s * n + (self.job.trainer.startup_grace_s if first else 0.0)
        try:
            results = ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            raise _Hang(f"no result for {n} step(s) within {timeout:g} s (trainer.step_timeout_s per step)") from None
        return results[0]  # rank 0's view: metrics are already averaged over ranks

    def _log(self, records: list[dict]) -> None:
        # Per-expert counts go to the observers (heatmaps, Ray metrics), not into every log line.
        self.runlog.write_metrics([{k: v for k, v in r.items() if k != "expert_counts"} for r in records])
        self.step = records[-1]["step"]
        for r in records:
            self._notify("on_metrics", self.on_metrics, r)

    # -- failures ------------------------------------------------------------------------------

    def _handle(self, exc: Exception, detected_at: float) -> tuple[bool, float, int]:
        failure = self._decide(exc)
        self._set(State.RECOVERING)
        while True:
            if self.group is not None:
                self.group.shutdown()
            try:
                self._start_group()
                break
            except Exception as exc2:  # the restart itself failed: same policy, same budget
                failure = self._decide(exc2)
        lost_steps = failure.step - self.step
        self._set(State.RUNNING)
        self.log(f"recovered: resumed from step {self.step}, replaying {lost_steps} step(s)")
        return True, detected_at, lost_steps

    def _decide(self, exc: Exception) -> Failure:
        """Record a failure and apply the policy: give up (raises JobFailed), or go on to a restart."""
        failure = _classify(exc, self.step)
        self._event("failure", kind=failure.kind.value, step=failure.step, message=failure.message[:2000])
        self.log(f"failure at step {failure.step} ({failure.kind.value}): {failure.message.splitlines()[0][:300]}")
        decision = on_failure(failure, self.failures, self.job.trainer.max_failures)
        if decision is Decision.GIVE_UP:
            self._give_up(failure)
        elif decision is Decision.SET_ASIDE:
            self._set_checkpoint_aside(failure.checkpoint, failure.message)
        else:
            self.failures += 1
        return failure

    def _record_recovery(self, first_record: dict, detected_at: float, lost_steps: int) -> None:
        seconds = time.monotonic() - detected_at
        first_record["recovery_s"] = seconds
        first_record["replayed_steps"] = lost_steps
        info = {"recovery_s": seconds, "replayed_steps": lost_steps, "resumed_at": first_record["step"] - 1}
        self.recoveries.append(info)
        self._event("recovered", **info)

    def _give_up(self, failure: Failure) -> None:
        if self.group is not None:
            self.group.shutdown()
        self._set(State.FAILED)
        last = checkpoint.latest_checkpoint(self.checkpoint_dir)
        summary = (
            f"job failed at step {failure.step} after {self.failures} recovered failure(s) "
            f"(trainer.max_failures={self.job.trainer.max_failures}); last failure: {failure.kind.value}: "
            f"{failure.message.splitlines()[0][:500]}. {self._checkpoints_note()} "
            + (f"Relaunch with resume=true and run_dir={self.run_dir} to continue." if last else "")
        )
        self._event("failed", step=failure.step, reason=summary)
        raise JobFailed(summary)


class _Hang(RuntimeError):
    pass


def _classify(exc: Exception, step: int) -> Failure:
    if isinstance(exc, _Hang):
        return Failure(FailureKind.HANG, str(exc), step)
    if isinstance(exc, CapacityError):
        return Failure(FailureKind.CAPACITY, str(exc), step)
    if isinstance(exc, RayActorError):
        return Failure(FailureKind.ACTOR_DIED, str(exc), step)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, checkpoint.CheckpointCorrupt):
        return Failure(FailureKind.CORRUPT_CHECKPOINT, str(exc.cause), step, checkpoint=exc.cause.path)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, ValueError):
        return Failure(FailureKind.INVALID, str(exc.cause), step)
    if isinstance(exc, RayTaskError):
        # A peer's death often surfaces first as a collective error on the survivors.
        return Failure(FailureKind.EXCEPTION, str(exc), step)
    return Failure(FailureKind.EXCEPTION, f"{type(exc).__name__}: {exc}", step)
