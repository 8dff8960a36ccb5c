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

import errno
import json
import re
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.exceptions import OutOfMemoryError as RayOutOfMemoryError

from ..config import JobConfig
from ..parallel import fsdp_enabled
from ..train import checkpoint, run_info
from ..train.step import Diverged
from .group import CapacityError, WorkerGroup
from .runlock import RunLock
from .policy import (
    FINAL, Decision, Failure, FailureKind, State, assign_ranks, check_transition, choose_layout, next_chunk, on_failure,
    keepers, snapshot_sources,
)  # fmt: skip

HEALABLE = (FailureKind.ACTOR_DIED, FailureKind.HANG, FailureKind.EXCEPTION)


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
        record = {"time": time.time(), "event": name, **_plain(fields)}
        with self.events_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour codes (Ray colours its error reports)


def _plain(value):
    """``value`` with terminal colour codes taken out of every string in it."""
    if isinstance(value, str):
        return _ANSI.sub("", value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
        # Recovery from peers' memory (trainer.recovery=peers, native engine): the snapshot refs of
        # every rank at self.step (the last step all ranks completed), the workers started to take
        # lost ranks' places (actor, bundle, ready ref), and when the group last changed size.
        t = job.trainer
        self.peers = t.recovery == "peers" and t.engine == "native"
        self.committed: list[list] | None = None  # per rank: snapshot refs that, merged, are its state
        # The commit before (step, refs): kept until the next, because the second copy of the
        # newest commit is fetched by its keeper during the next chunk; until that fetch is done
        # only this one is sure to be on two nodes.
        self.previous: tuple[int, list[list]] | None = None
        self.spares: list[tuple] = []
        self.last_resize = time.monotonic()
        self._inflight: list = []  # the metrics refs of the chunk in flight
        self._inflight_snapshots: list = []  # and its snapshot refs
        self._source = "checkpoint"  # where the last recovery's state came from
        self._replaced: list[int] = []  # the ranks the last heal from peers replaced
        self._changes: list[str] = []  # what resume_with_changes let through (check_checkpoints)
        # One job per run and checkpoint directory, for the job's life (runlock.py). Both, always:
        # another job may name this run's checkpoints as its trainer.checkpoint_dir.
        self.locks = [RunLock(self.run_dir, "run directory"), RunLock(self.checkpoint_dir, "checkpoint directory")]

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
        try:
            self.check_checkpoints()  # a refusal writes nothing: the directories may be another job's
            try:
                return self._run()
            except JobFailed:
                raise
            except BaseException as exc:  # the controller itself failed (a bug, an interrupt): say so, free the workers
                if self.state not in (State.FINISHED, State.FAILED):
                    self._abort(exc)
                raise
        finally:
            self.release_locks()

    def check_checkpoints(self) -> None:
        """Take the run's locks, and raise ValueError when the run or checkpoint directory holds an
        earlier run's records and the job does not say resume=true, or when the checkpoint to resume
        is of another architecture, tokenizer, data or sequence shape (the last two allowed with
        resume_with_changes=true). Needs no Ray: ``run_job`` calls it before connecting, so that
        the mistake costs nothing."""
        try:
            for lock in self.locks:
                lock.acquire()
            self._check_records()
        except BaseException:
            self.release_locks()  # refused: the directories stay free for the job that may use them
            raise

    def release_locks(self) -> None:
        for lock in self.locks:
            lock.release()

    def _check_records(self) -> None:
        latest = checkpoint.latest_checkpoint(self.checkpoint_dir)
        logs = (self.runlog.metrics_path, self.runlog.events_path)
        records = [p.name for p in logs if p.is_file() and p.stat().st_size]
        if (latest or records) and not self.job.resume:
            held = f"{self.checkpoint_dir} already holds checkpoints"
            what = held if latest else f"{self.run_dir} holds {', '.join(records)}"
            raise ValueError(
                f"{what} of an earlier run; pass resume=true to continue it, or choose a new run directory"
            )
        if latest:
            checkpoint.check_model_config(latest, self.job.model)
            tokenizer, changes = run_info.resume_changes(checkpoint.read_info(latest), self.job.trainer, self.job.data)
            if tokenizer:
                raise ValueError(
                    f"checkpoint {latest} was trained with another tokenizer ({tokenizer}): its token ids mean other "
                    "text. Resume with data prepared with the checkpoint's tokenizer, or start a new run"
                )
            if changes and not self.job.resume_with_changes:
                raise ValueError(
                    f"resuming checkpoint {latest} with other data or sequence shape ({'; '.join(changes)}); set those "
                    "keys back to the checkpoint's values, or pass resume_with_changes=true to continue with them (an "
                    "event records the change)"
                )
            self._changes = changes

    def _run(self) -> dict:
        self._event("started", resume=self.job.resume)
        if self._changes:
            self._event("resumed_with_changes", changes=self._changes)
            self.log(f"resuming with changes (resume_with_changes=true): {'; '.join(self._changes)}")
        just_recovered, detected_at, lost_steps = False, None, 0
        # A failure before the first chunk (an unreadable checkpoint, say) is at the last logged step.
        self.step = self.runlog.last_step() if self.job.resume else 0
        try:
            self._start_group()
            self._set(State.RUNNING)
        except Exception as exc:  # the first start fails like any later one
            just_recovered, detected_at, lost_steps = self._handle(exc, time.monotonic())
        while self.step < self.job.trainer.max_steps:
            n = next_chunk(
                self.step, self.job.trainer.max_steps, self.job.trainer.checkpoint_every, self.chunk_steps, just_recovered
            )
            if self.peers:
                n = min(n, self.job.trainer.snapshot_every)  # a chunk ends in a commit
            try:
                if self.peers and not just_recovered:
                    self._maybe_grow()
                records = self._run_chunk(n, first=self.group.chunks_run == 0)
            except Exception as exc:
                just_recovered, detected_at, lost_steps = self._handle(exc, time.monotonic())
                continue
            if just_recovered:
                self._record_recovery(records[0], detected_at, lost_steps)
                just_recovered = False
            self._log(records)
        self._set(State.FINISHED)
        self.group.shutdown(also=[spare for spare, _, _ in self.spares])
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
            self.group.shutdown(also=[spare for spare, _, _ in self.spares])
        self.state = State.FAILED
        reason = f"the controller stopped at step {self.step}: {type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"
        self._event("failed", step=self.step, reason=f"{reason}. {self._checkpoints_note()}")

    def _start_group(self) -> None:
        self.group = WorkerGroup(self.job, self.checkpoint_dir, self.chunk_steps, log=self.log)
        self.committed, self.spares = None, []
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
        world = self.group.layout.world
        wards = None
        if self.peers and self.committed is not None and world > 1:
            holders = keepers(self.group.nodes)
            wards = [[ref for w in range(world) if holders[w] == r for ref in self.committed[w]] for r in range(world)]
        refs, snapshots = self.group.run(n, wards, snapshot=self.peers)
        self._inflight, self._inflight_snapshots = refs, snapshots
        timeout = self.job.trainer.step_timeout_s * n + (self.job.trainer.startup_grace_s if first else 0.0)
        try:
            results = ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            silent = self.group.unresponsive(timeout_s=5.0)
            who = f"rank(s) {silent} stopped answering" if silent else "every rank answers, so a collective is stuck"
            raise _Hang(
                f"no result for {n} step(s) within {timeout:g} s (trainer.step_timeout_s per step): {who}", silent
            ) from None
        except (RayActorError, RayTaskError) as exc:
            # The first error in rank order may be a survivor's collective failing: name the dead.
            dead = self.group.failed_ranks(refs, wait_s=2.0)
            if dead:
                raise _Lost(exc, dead) from exc
            # A rank that ran out of memory is the cause, whatever its peers' collectives said first.
            raise _allocation_failure(refs) or exc
        if self.peers:
            if self.committed is not None:
                self.previous = (self.step, self.committed)
            self.committed = [[ref] for ref in snapshots]  # every rank finished: the chunk's end is the new cut
        return results[0]  # rank 0's view: metrics are already averaged over ranks

    def _log(self, records: list[dict]) -> None:
        # Per-expert counts go to the observers (heatmaps, Ray metrics), not into every log line.
        self.runlog.write_metrics([{k: v for k, v in r.items() if k != "expert_counts"} for r in records])
        self.step = records[-1]["step"]
        for r in records:
            if r.get("skipped"):  # trainer.nan_policy=skip left this step's update out
                self._event("step_skipped", step=r["step"], loss=r["loss"], grad_norm=r["grad_norm"])
                self.log(f"step {r['step']} skipped (trainer.nan_policy=skip): loss {r['loss']}, norm {r['grad_norm']}")
            self._notify("on_metrics", self.on_metrics, r)

    # -- failures ------------------------------------------------------------------------------

    def _handle(self, exc: Exception, detected_at: float) -> tuple[bool, float, int]:
        failure = self._decide(exc)
        self._set(State.RECOVERING)
        if self.peers and self.committed is not None and failure.kind in HEALABLE:
            try:
                logged = self.step
                self._heal(failure)
                self._set(State.RUNNING)
                self._source = "peers"
                self.log(f"recovered from peers' memory at step {self.step} on {self.group.layout.world} worker(s)")
                return True, detected_at, logged - self.step
            except JobFailed:
                raise
            except CapacityError as exc2:
                self._give_up(Failure(FailureKind.CAPACITY, str(exc2), self.step))
            except Exception as exc2:  # some state has no copy left in memory, or a peer failed too
                why = f"{type(exc2).__name__}: {(str(exc2).splitlines() or [''])[0][:300]}"
                self.runlog.event("heal_failed", step=self.step, message=why)
                self.log(f"recovery from peers failed ({why}); restarting from the latest checkpoint")
        self._source = "checkpoint"
        while True:
            if self.group is not None:
                self.group.shutdown(also=[spare for spare, _, _ in self.spares])
            try:
                self._start_group()
                break
            except Exception as exc2:  # the restart itself failed: same policy, same budget
                failure = self._decide(exc2)
        lost_steps = max(0, failure.step - self.step)  # a new run dir resuming a shared checkpoint dir has no log
        self._set(State.RUNNING)
        self.log(f"recovered: resumed from step {self.step}, replaying {lost_steps} step(s)")
        return True, detected_at, lost_steps

    # -- recovery from peers' memory ------------------------------------------------------

    def _heal(self, failure: Failure) -> None:
        """Re-form the group around the lost ranks at the last committed step, state from memory.

        The lost ranks are killed (a stopped one holds its peers in collectives until its sockets
        close); the survivors' chunk calls then end with collective errors, and they join a new
        process group, each restoring the committed snapshot of its new rank from the object
        store. Lost ranks' places go to workers started in their bundles; until those are up the
        job runs on the largest layout the survivors form (``choose_layout``).
        """
        g, t, c = self.group, self.job.trainer, self.job.cluster
        old = g.layout
        lost = set(failure.ranks)
        g.kill([g.workers[r] for r in lost])
        # The survivors' chunk calls end once their collectives see the lost ranks' sockets close.
        # A stopped process is killed only after Ray's graceful-exit timeout (about 5 s), so the
        # wait allows for that on top of a step.
        ready, _ = ray.wait(self._inflight, num_returns=len(self._inflight), timeout=t.step_timeout_s + 15.0)
        stuck = {r for r, ref in enumerate(self._inflight) if ref not in ready}
        silent = set(g.unresponsive(timeout_s=5.0))  # dead, or stopped
        self.log(f"healing: lost {sorted(lost)}, stuck {sorted(stuck)}, silent {sorted(silent)}")
        lost |= stuck | silent
        self._replaced = sorted(lost)  # a survivor stuck in a collective is replaced too: the event says so
        _drain(self._inflight, self._inflight_snapshots)
        if not lost:
            raise RuntimeError(f"no lost rank found for a {failure.kind.value} failure: a replay would fail alike")
        g.kill([g.workers[r] for r in lost])
        survivors = [r for r in range(old.world) if r not in lost]
        for r in sorted(lost):
            self.spares.append((g.spawn(g.bundles[r]), g.bundles[r], None))
        self.spares = [(a, b, a.pid.remote() if ref is None else ref) for a, b, ref in self.spares]
        members = [(g.workers[r], g.bundles[r], r) for r in survivors]
        # Spares already up (survivors a smaller layout left out, replacements that have started)
        # join at once; below cluster.min_workers the job waits for more.
        deadline = time.monotonic() + t.capacity_timeout_s
        while (layout := self._layout_for(len(members) + len(self._ready_spares()))) is None:
            if time.monotonic() > deadline:
                raise CapacityError(
                    f"{len(members)} worker(s) left, fewer than cluster.min_workers={c.min_workers}, and no "
                    f"replacement could be placed within trainer.capacity_timeout_s={t.capacity_timeout_s:g} s"
                )
            time.sleep(0.5)
        members += [(a, b, None) for a, b, _ in self._ready_spares()[: max(0, layout.world - len(members))]]
        try:
            self._reform(members, old, layout, reason="lost")
        except Exception as exc:
            if self.previous is None:
                raise
            # The newest commit's second copy may not have reached its keeper before the node
            # holding the first went: heal from the commit before, one chunk further back.
            step, refs = self.previous
            self.log(f"healing from the newest commit failed ({type(exc).__name__}); using the one of step {step}")
            self.committed, self.previous, self.step = refs, None, step
            self.runlog.truncate_after(step)
            self._reform(members, old, layout, reason="lost")

    def _layout_for(self, available: int):
        t, c = self.job.trainer, self.job.cluster
        return choose_layout(
            available, target=c.num_workers, ep=self.job.parallel.ep, grad_accum=t.grad_accum,
            num_experts=self.job.model.moe.num_experts, global_batch_size=t.global_batch_size, min_workers=c.min_workers,
        )  # fmt: skip

    def _ready_spares(self) -> list[tuple]:
        """The spares that are up. A dead one (its node gone) is replaced by a new one in its bundle."""
        refs = [ref for _, _, ref in self.spares]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        up, spares = [], []
        for spare in self.spares:
            actor, bundle, ref = spare
            if ref in ready:
                try:
                    ray.get(ref)
                    up.append(spare)
                except Exception:
                    fresh = self.group.spawn(bundle)
                    spare = (fresh, bundle, fresh.pid.remote())
            spares.append(spare)
        self.spares = spares
        return up

    def _reform(self, members: list[tuple], old, layout, reason: str) -> None:
        """Make ``members`` ((actor, bundle, old rank or None), survivors first) the ranks of ``layout``."""
        g = self.group
        chosen = assign_ranks([m[2] for m in members], old, layout)
        alive = {m[2] for m in members if m[2] is not None}
        num_experts = self.job.model.moe.num_experts
        sharded = self.job.trainer.engine == "native" and fsdp_enabled(self.job.parallel.fsdp, old.world)
        pieces = [
            [
                ref
                for r in snapshot_sources(rank, layout, members[i][2], old, alive, num_experts, sharded)
                for ref in self.committed[r]
            ]
            for rank, i in enumerate(chosen)
        ]
        workers = [members[i][0] for i in chosen]
        idle = [m for i, m in enumerate(members) if i not in chosen]
        steps = g.reform(workers, [members[i][1] for i in chosen], layout, pieces=pieces)
        # Only now that the new group stands: the spares it took in are no longer spares, and
        # survivors left out of the layout stay warm, as spares for growing back.
        used = {id(w) for w in workers}
        self.spares = [s for s in self.spares if id(s[0]) not in used]
        self.spares += [(a, b, a.pid.remote()) for a, b, r in idle if r is not None]
        if set(steps) != {self.step}:
            raise RuntimeError(f"ranks restored steps {steps}, not the committed step {self.step}")
        self.committed = pieces  # the same cut, in the new layout: a failure before the next commit heals too
        self.previous = None  # in the old layout's ranks: no longer usable
        self.last_resize = time.monotonic()
        if (layout.world, layout.ep) != (old.world, old.ep):
            self._event("resized", from_world=old.world, to_world=layout.world, from_ep=old.ep, to_ep=layout.ep,
                        reason=reason, step=self.step)  # fmt: skip
            self.log(f"resized ({reason}): {old.world} -> {layout.world} workers, ep {old.ep} -> {layout.ep}")

    def _maybe_grow(self) -> None:
        """At a step boundary, at most every cluster.resize_check_s: take in spares that are up."""
        g, c = self.group, self.job.cluster
        if g.layout.world >= c.num_workers or time.monotonic() - self.last_resize < c.resize_check_s:
            return
        self.last_resize = time.monotonic()
        ready = self._ready_spares()
        layout = self._layout_for(g.layout.world + len(ready))
        if not ready or layout is None or layout.world <= g.layout.world:
            return
        members = [(w, b, r) for r, (w, b) in enumerate(zip(g.workers, g.bundles))]
        members += [(a, b, None) for a, b, _ in ready[: layout.world - g.layout.world]]
        self._reform(members, g.layout, layout, reason="grew")

    def _decide(self, exc: Exception) -> Failure:
        """Record a failure and apply the policy: give up (raises JobFailed), or go on to a restart."""
        failure = _classify(exc, self.step)
        self._event(
            "failure", kind=failure.kind.value, step=failure.step, ranks=list(failure.ranks), message=failure.message[:2000]
        )
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
        layout = self.group.layout
        info = {
            "recovery_s": seconds, "replayed_steps": lost_steps, "resumed_at": first_record["step"] - 1,
            "source": self._source, "world_size": layout.world, "ep": layout.ep,
        }  # fmt: skip
        if self._source == "peers":
            info["replaced_ranks"] = self._replaced
        self.recoveries.append(info)
        self._event("recovered", **info)

    def _give_up(self, failure: Failure) -> None:
        if self.group is not None:
            self.group.shutdown(also=[spare for spare, _, _ in self.spares])
        self._set(State.FAILED)
        last = checkpoint.latest_checkpoint(self.checkpoint_dir)
        if failure.kind in FINAL:  # not a matter of budget: say what it was, not how many came before
            head = f"job failed at step {failure.step} ({failure.kind.value}, not retried: a replay would fail alike)"
        else:
            head = (
                f"job failed at step {failure.step} after {self.failures} recovered failure(s) "
                f"(trainer.max_failures={self.job.trainer.max_failures}); last failure: {failure.kind.value}"
            )
        summary = (
            f"{head}: {failure.message.splitlines()[0][:1000]}. {self._checkpoints_note()} "
            + (f"Relaunch with resume=true and run_dir={self.run_dir} to continue."
               if last and failure.kind is not FailureKind.OUT_OF_MEMORY else "")
        )
        self._event("failed", step=failure.step, reason=summary)
        raise JobFailed(summary)


def _drain(metrics: list, snapshots: list) -> None:
    """Read the errors of a failed chunk's finished tasks (Ray prints every error never read); the
    snapshots of the ranks that did finish are not fetched (they are whole rank states)."""
    for m, s in zip(metrics, snapshots):
        try:
            ray.get(m, timeout=0)
        except Exception:
            try:
                ray.get(s, timeout=0)
            except Exception:
                pass


class _Hang(RuntimeError):
    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class _Lost(RuntimeError):
    """A worker process (or its node) is gone; ``ranks`` are the ones found dead."""

    def __init__(self, cause: Exception, ranks: list[int]):
        super().__init__(f"rank(s) {ranks} died: {cause}" if ranks else str(cause))
        self.ranks = ranks


# errno values of a disk that is full or refuses writes: a replay would meet them again. A save's
# errors are told by their type (checkpoint.CheckpointWriteError); elsewhere only a full or
# read-only disk is that sure (an EACCES while reading data, say, is not the checkpoint disk's).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _cause_line(exc: BaseException) -> str:
    """The error a worker raised, in one line: its type and message, not Ray's wrapper around it."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text[:500]}"


def _classify(exc: Exception, step: int) -> Failure:
    if isinstance(exc, _Hang):
        return Failure(FailureKind.HANG, str(exc), step, ranks=tuple(exc.ranks))
    if isinstance(exc, CapacityError):
        return Failure(FailureKind.CAPACITY, str(exc), step)
    if isinstance(exc, _Lost):
        return Failure(FailureKind.ACTOR_DIED, str(exc), step, ranks=tuple(exc.ranks))
    if isinstance(exc, RayActorError):
        return Failure(FailureKind.ACTOR_DIED, str(exc), step)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, checkpoint.CheckpointCorrupt):
        return Failure(FailureKind.CORRUPT_CHECKPOINT, str(exc.cause), step, checkpoint=exc.cause.path)
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, (Diverged, checkpoint.NonFiniteState)):
        return Failure(FailureKind.DIVERGED, f"{cause}\n{exc}", step)
    if isinstance(cause, checkpoint.CheckpointWriteError) and cause.errno in STORAGE_ERRNOS:
        return Failure(FailureKind.STORAGE, f"{_cause_line(exc)}. {STORAGE_HINT}\n{exc}", step)
    if isinstance(cause, OSError) and cause.errno in FULL_ERRNOS:  # a disk the job writes elsewhere (/dev/shm, say)
        return Failure(FailureKind.STORAGE, f"{_cause_line(exc)}. {FULL_HINT}\n{exc}", step)
    # Ray's memory monitor killed a task, or a worker's allocation failed.
    if isinstance(exc, RayOutOfMemoryError) or (isinstance(exc, RayTaskError) and _is_allocation_failure(exc.cause)):
        cause = exc.cause if isinstance(exc, RayTaskError) else exc
        what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
        return Failure(FailureKind.OUT_OF_MEMORY, f"{OUT_OF_MEMORY_HINT} ({what})\n{exc}", step)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, ValueError):
        return Failure(FailureKind.INVALID, str(exc.cause), step)
    if isinstance(exc, RayTaskError):
        # A peer's death often surfaces first as a collective error on the survivors. The first
        # line names the worker's own error; Ray's report (with the traceback) follows.
        return Failure(FailureKind.EXCEPTION, f"{_cause_line(exc)}\n{exc}", step)
    return Failure(FailureKind.EXCEPTION, f"{type(exc).__name__}: {exc}", step)


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


def _is_allocation_failure(exc: BaseException | None) -> bool:
    """A failed allocation: Python's MemoryError, torch's (CUDA) OutOfMemoryError, or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "CUDA out of memory")
    )


def _allocation_failure(refs: list) -> RayTaskError | None:
    """The first finished chunk, in rank order, that failed allocating memory."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in refs:
        if ref in ready:
            try:
                ray.get(ref, timeout=0)
            except RayTaskError as exc:
                if _is_allocation_failure(exc.cause):
                    return exc
            except Exception:  # a dead actor, or another error: not this one's business
                pass
    return None
