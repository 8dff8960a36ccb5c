"""The controller: drives the worker group through the job and through its failures.

A state machine: each state (states.py) is a frozen value carrying what its step needs, and
``run`` is ``while not state.terminal: state = self.advance(state)``. The decisions are pure
functions: the failure policy in failures.py, chunk sizes and layouts in policy.py.

    Starting   -> Running                   workers placed, the checkpoint (if any) loaded
    Starting   -> Restarting                the first start failed (it fails like any later one)
    Running    -> Running                   a chunk of steps ran
    Running    -> Resizing -> Running       spares are up: the group grows back (recovery=peers)
    Running    -> Healing  -> Running       a rank lost: survivors re-form, state from peers' memory
    Running    -> Restarting -> Running     every worker replaced, state from the latest checkpoint
    Resizing   -> Healing | Restarting      the re-form failed
    Healing    -> Restarting                the heal failed: fall back to the checkpoint
    Restarting -> Restarting                the restart failed too: same policy, same budget
    Running    -> Done                      trainer.max_steps reached
    every other  -> Failed                  the policy gives up (Done and Failed are terminal)

A restart resumes from the latest complete checkpoint; the data sampler's state comes with it, so
the replay reads exactly the samples the lost steps read. ``metrics.jsonl`` keeps one line per
step: on recovery it is cut back to the step resumed from and the replayed steps are written again.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import JobConfig, job_layout
from ..parallel.layout import Layout
from ..train import checkpoint
from .failures import FINAL, HEALABLE, CapacityError, Decision, Failure, FailureKind, JobFailed, classify, on_failure
from .group import WorkerGroup
from .heal import Chunk, Peers
from .policy import next_chunk
from .resume import Checkpoints
from .runlock import RunLock
from .runlog import RunLog
from .states import (
    Done, Failed, Healing, Recovery, Restarting, Resizing, Running, Starting, State, check_transition,
)  # fmt: skip

__all__ = ["Controller", "JobFailed"]


class Controller:
    def __init__(
        self, job: JobConfig, run_dir: str | Path, *, layout: Layout | None = None, chunk_steps: int = 10, log=print
    ):
        """``layout``: the job's (``config.job_layout``), where the launcher has built it already."""
        self.job, self.run_dir, self.chunk_steps, self.log = job, Path(run_dir), chunk_steps, log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = job.trainer.checkpoint_dir or str(self.run_dir / "checkpoints")
        self.runlog = RunLog(self.run_dir, log=log)
        self.checkpoints = Checkpoints(job, self.run_dir, self.checkpoint_dir, self.runlog, log=log)
        self.state: State = Starting()
        self.layout = layout or job_layout(job)  # what the job was configured as; heals resize it
        self.group: WorkerGroup | None = None
        self.peers: Peers | None = None  # recovery from peers' memory (trainer.recovery=peers, native engine)
        self.step = 0  # last step whose metrics are logged: written by _rewind and _log only
        self.failures = 0
        self.recoveries: list[dict] = []
        self._chunk: Chunk | None = None  # the calls of the last chunk started
        # One job per run and checkpoint directory, for the job's life (runlock.py). Both, always:
        # another job may name this run's checkpoints as its trainer.checkpoint_dir.
        self.locks = [RunLock(self.run_dir, "run directory"), RunLock(self.checkpoint_dir, "checkpoint directory")]

    @property
    def on_metrics(self) -> list:
        """Callbacks(step record) for progress displays and loggers."""
        return self.runlog.on_metrics

    @property
    def on_event(self) -> list:
        """Callbacks(event record): started, failure, recovered, finished, failed, ..."""
        return self.runlog.on_event

    @property
    def set_aside(self) -> list[str]:
        """Unreadable checkpoints moved out of the way."""
        return self.checkpoints.set_aside

    def _resume_point(self) -> str | None:
        return self.checkpoints.resume_point()

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict:
        """Run the job to the end; returns a summary. Raises JobFailed when it gives up.

        Mistakes in what was asked (a checkpoint of another architecture, or one that would be
        overwritten) raise ValueError before anything starts.
        """
        try:
            self.check_checkpoints()  # a refusal writes nothing: the directories may be another job's
            try:
                while not self.state.terminal:
                    self.state = self.advance(self.state)
            except BaseException as exc:  # the controller itself failed (a bug, an interrupt): say so, free the workers
                if not self.state.terminal:
                    self.state = self._abort(exc)
                raise
            if isinstance(self.state, Failed):
                raise JobFailed(self.state.summary)
            return self.state.summary
        finally:
            self.release_locks()

    def advance(self, state: State) -> State:
        """One step of the state machine: act on ``state``, return the next one."""
        steps = {Starting: self._start, Running: self._run, Resizing: self._resize, Healing: self._heal,
                 Restarting: self._restart}  # fmt: skip
        new = steps[type(state)](state)
        check_transition(state, new)
        return new

    def _start(self, state: Starting) -> State:
        self.runlog.announce("started", resume=self.job.resume)
        if changes := self.checkpoints.changes:
            self.runlog.announce("resumed_with_changes", changes=changes)
            self.log(f"resuming with changes (resume_with_changes=true): {'; '.join(changes)}")
        t = self.job.trainer
        if t.recovery == "peers" and t.engine == "native":
            self.peers = Peers(self.job, self.layout, self.runlog, log=self.log)
        # A failure before the first chunk (an unreadable checkpoint, say) is at the last logged step.
        self.step = self.runlog.last_step() if self.job.resume else 0
        try:
            self._start_group()
        except Exception as exc:  # the first start fails like any later one
            return self._fail(exc, time.monotonic())
        return Running()

    def _run(self, state: Running) -> State:
        t = self.job.trainer
        if self.step >= t.max_steps:
            return self._finish()
        recovered = state.recovered is not None
        snapshot_every = t.snapshot_every if self.peers else None  # a chunk ends in a commit
        n = next_chunk(self.step, t.max_steps, t.checkpoint_every, self.chunk_steps, recovered, snapshot_every)
        try:
            if self.peers and not recovered and not state.resized and (growth := self.peers.growth(self.group)):
                return Resizing(*growth)
            records = self._run_chunk(n)
        except Exception as exc:
            return self._fail(exc, time.monotonic())
        if recovered:
            self._record_recovery(records[0], state.recovered)
        self._log(records)
        return Running()

    def _resize(self, state: Resizing) -> State:
        try:
            self.peers.grow(self.group, state.layout, state.joining)
        except Exception as exc:
            return self._fail(exc, time.monotonic())
        return Running(resized=True)

    def _heal(self, state: Healing) -> State:
        logged = self.step
        try:
            replaced = self.peers.heal(self.group, state.failure, state.chunk, rewind=self._rewind)
        except CapacityError as exc:
            return self._give_up(Failure(FailureKind.CAPACITY, str(exc), self.step))
        except Exception as exc:  # some state has no copy left in memory, or a peer failed too
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            self.runlog.event("heal_failed", step=self.step, message=why)
            self.log(f"recovery from peers failed ({why}); restarting from the latest checkpoint")
            return Restarting(state.failure, state.detected_at)
        self.log(f"recovered from peers' memory at step {self.step} on {self.group.layout.world} worker(s)")
        return Running(Recovery(state.detected_at, logged - self.step, "peers", tuple(replaced)))

    def _restart(self, state: Restarting) -> State:
        self._shutdown()
        try:
            self._start_group()
        except Exception as exc:  # the restart itself failed: same policy, same budget
            return self._fail(exc, state.detected_at)
        lost_steps = max(0, state.failure.step - self.step)  # a new run dir resuming a shared checkpoint dir has no log
        self.log(f"recovered: resumed from step {self.step}, replaying {lost_steps} step(s)")
        return Running(Recovery(state.detected_at, lost_steps, "checkpoint"))

    def _finish(self) -> Done:
        summary = {
            "steps": self.step,
            "failures": self.failures,
            "recoveries": self.recoveries,
            "run_dir": str(self.run_dir),
            "checkpoint_dir": self.checkpoint_dir,
            "last_checkpoint": str(checkpoint.latest_checkpoint(self.checkpoint_dir)),
        }
        # Terminal before the workers go: an error from here on is not the controller's own failure
        # (run() would write a second, "failed", event).
        self.state = Done(summary)
        self._shutdown()
        self.runlog.announce("finished", **{k: v for k, v in summary.items() if k != "recoveries"})
        return self.state

    def _abort(self, exc: BaseException) -> Failed:
        self._shutdown()
        first_line = str(exc).splitlines()[0][:500] if str(exc) else ""
        reason = f"the controller stopped at step {self.step}: {type(exc).__name__}: {first_line}"
        self.runlog.announce("failed", step=self.step, reason=f"{reason}. {self.checkpoints.note()}")
        return Failed(reason)

    def _shutdown(self) -> None:
        """Kill every worker, spares too, and release the placement group."""
        if self.group is not None:
            self.group.shutdown(also=[s.actor for s in self.peers.spares] if self.peers else [])

    # -- the group, the chunks, the log --------------------------------------------------------

    def _start_group(self) -> None:
        if self.peers:
            self.peers.reset()
        self.group = WorkerGroup(self.job, self.checkpoint_dir, self.chunk_steps, log=self.log)
        self._rewind(self.group.start(self.layout, self._resume_point()))

    def _rewind(self, step: int) -> None:
        """The job goes on from ``step``: steps after it will be replayed, so their lines go (the
        replay writes them again)."""
        self.runlog.truncate_after(step)
        self.step = step

    def _run_chunk(self, n: int) -> list[dict]:
        g, t = self.group, self.job.trainer
        timeout = t.step_timeout_s * n + (t.startup_grace_s if g.chunks_run == 0 else 0.0)
        self._chunk = Chunk(*g.run(n, self.peers.wards(g) if self.peers else None, snapshot=self.peers is not None))
        records = g.results(self._chunk.metrics, n, timeout)[0]  # rank 0's view: metrics are already averaged
        if self.peers:  # every rank finished: the chunk's end is the new cut
            self.peers.commit(records[-1]["step"], self._chunk.snapshots)
        return records

    def _log(self, records: list[dict]) -> None:
        # Per-expert counts go to the observers (heatmaps, Ray metrics), not into every log line.
        self.runlog.write_metrics([{k: v for k, v in r.items() if k != "expert_counts"} for r in records])
        self.step = records[-1]["step"]
        for r in records:
            if r.get("skipped"):  # trainer.nan_policy=skip left this step's update out
                self.runlog.announce("step_skipped", step=r["step"], loss=r["loss"], grad_norm=r["grad_norm"])
                self.log(f"step {r['step']} skipped (trainer.nan_policy=skip): loss {r['loss']}, norm {r['grad_norm']}")
            self.runlog.tell_metrics(r)

    def _record_recovery(self, first_record: dict, recovery: Recovery) -> None:
        seconds = time.monotonic() - recovery.detected_at
        first_record["recovery_s"] = seconds
        first_record["replayed_steps"] = recovery.replayed_steps
        layout = self.group.layout
        info = {
            "recovery_s": seconds, "replayed_steps": recovery.replayed_steps, "resumed_at": first_record["step"] - 1,
            "source": recovery.source, "world_size": layout.world, "ep": layout.ep,
        }  # fmt: skip
        if recovery.source == "peers":
            info["replaced_ranks"] = list(recovery.replaced)
        self.recoveries.append(info)
        self.runlog.announce("recovered", **info)

    # -- failures ------------------------------------------------------------------------------

    def _fail(self, exc: Exception, detected_at: float) -> State:
        """Record a failure and apply the policy: give up, heal from peers' memory, or restart."""
        failure = classify(exc, self.step)
        self.runlog.announce("failure", kind=failure.kind.value, step=failure.step, ranks=list(failure.ranks),
                             message=failure.message[:2000])  # fmt: skip
        self.log(f"failure at step {failure.step} ({failure.kind.value}): {failure.message.splitlines()[0][:300]}")
        decision = on_failure(failure, self.failures, self.job.trainer.max_failures)
        if decision is Decision.GIVE_UP:
            return self._give_up(failure)
        if decision is Decision.SET_ASIDE:
            self.checkpoints.put_aside(failure.checkpoint, failure.message)
        else:
            self.failures += 1
        if self.peers and self.peers.committed is not None and failure.kind in HEALABLE:
            return Healing(failure, detected_at, self._chunk)
        return Restarting(failure, detected_at)

    def _give_up(self, failure: Failure) -> Failed:
        self._shutdown()
        last = checkpoint.latest_checkpoint(self.checkpoint_dir)
        if failure.kind in FINAL:  # not a matter of budget: say what it was, not how many came before
            head = f"job failed at step {failure.step} ({failure.kind.value}, not retried: a replay would fail alike)"
        else:
            head = (
                f"job failed at step {failure.step} after {self.failures} recovered failure(s) "
                f"(trainer.max_failures={self.job.trainer.max_failures}); last failure: {failure.kind.value}"
            )
        summary = (
            f"{head}: {failure.message.splitlines()[0][:1000]}. {self.checkpoints.note()} "
            + (f"Relaunch with resume=true and run_dir={self.run_dir} to continue."
               if last and failure.kind is not FailureKind.OUT_OF_MEMORY else "")
        )
        self.state = Failed(summary, failure)  # terminal before the event: an interrupt now writes no second one
        self.runlog.announce("failed", step=failure.step, reason=summary)
        return self.state

    # -- the run's locks and records, before anything starts -----------------------------------

    def check_checkpoints(self) -> None:
        """Take the run's locks, and raise ValueError when the run or checkpoint directory holds an
        earlier run's records and the job does not say resume=true, or when the checkpoint to resume
        is of another architecture, tokenizer, data or sequence shape (the last two allowed with
        resume_with_changes=true). Needs no Ray: ``run_job`` calls it before connecting, so that
        the mistake costs nothing."""
        try:
            for lock in self.locks:
                lock.acquire()
            self.checkpoints.check()
        except BaseException:
            self.release_locks()  # refused: the directories stay free for the job that may use them
            raise

    def release_locks(self) -> None:
        for lock in self.locks:
            lock.release()
