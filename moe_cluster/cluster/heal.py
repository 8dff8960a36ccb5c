"""Recovery from peers' memory (trainer.recovery=peers, native engine): the commits, the spares,
and the re-forms that shrink the group around lost ranks and grow it back.

After every chunk each rank's state is a snapshot in Ray's object store: together they are the
*commit*, the last step all ranks completed. A heal kills the lost ranks, re-forms the survivors
(and spares that are up) as the largest layout they can form, each restoring its new rank's state
from the commit, and starts replacements in the lost ranks' bundles; a grow takes those in once
they are up. ``Peers`` is the one owner of the commits and the spares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray import ObjectRef

from ..config import JobConfig
from ..parallel.layout import Layout
from .failures import CapacityError, Failure
from .group import WorkerGroup
from .policy import assign_ranks, choose_layout, keepers, lost_ranks, snapshot_sources
from .runlog import RunLog


@dataclass(frozen=True)
class Spare:
    """A worker outside the group, kept warm to take a rank: a replacement started in a lost
    rank's bundle, or a survivor a smaller layout left out. ``ready`` ends once its process is up."""

    actor: object  # a TrainWorker actor handle
    bundle: int
    ready: ObjectRef


@dataclass(frozen=True)
class Member:
    """A worker of a re-form: a rank of the old layout (``old_rank``), or a spare (None, holding nothing)."""

    actor: object
    bundle: int
    old_rank: int | None


@dataclass(frozen=True)
class Commit:
    """The last step every rank completed, and per rank the snapshot refs that, merged, are its state."""

    step: int
    refs: list[list]


@dataclass(frozen=True)
class Chunk:
    """The calls of one chunk of steps, in rank order: metrics refs and snapshot refs."""

    metrics: list
    snapshots: list


class Peers:
    def __init__(self, job: JobConfig, layout: Layout, runlog: RunLog, log=print):
        self.job, self.layout, self.runlog, self.log = job, layout, runlog, log  # layout: the job's
        self.committed: Commit | None = None
        # The commit before: kept until the next, because the second copy of the newest commit is
        # fetched by its keeper during the next chunk; until that fetch is done only this one is
        # sure to be on two nodes.
        self.previous: Commit | None = None
        self.spares: list[Spare] = []
        self.last_resize = time.monotonic()  # when the group last changed size

    def reset(self) -> None:
        """A new group (from a checkpoint): nothing committed, no spares (the old ones were killed)."""
        self.committed, self.previous, self.spares = None, None, []

    def wards(self, group: WorkerGroup) -> list[list] | None:
        """For each rank, the committed snapshot refs it keeps a second copy of (``keepers``)."""
        world = group.layout.world
        if self.committed is None or world <= 1:
            return None
        holders = keepers(group.nodes)
        return [[ref for w in range(world) if holders[w] == r for ref in self.committed.refs[w]] for r in range(world)]

    def commit(self, step: int, snapshots: list) -> None:
        """Every rank finished the chunk: its end, ``step``, is the new cut."""
        if self.committed is not None:
            self.previous = self.committed
        self.committed = Commit(step, [[ref] for ref in snapshots])

    # -- heal --------------------------------------------------------------------------------

    def heal(self, group: WorkerGroup, failure: Failure, chunk: Chunk, rewind) -> list[int]:
        """Re-form the group around the lost ranks at the committed step, state from memory;
        returns the ranks replaced. ``rewind(step)``: the job goes back to ``step`` (the commit
        before, when the newest one cannot be restored).

        The lost ranks are killed (a stopped one holds its peers in collectives until its sockets
        close); the survivors' chunk calls then end with collective errors, and they join a new
        process group, each restoring the committed snapshot of its new rank from the object
        store. Lost ranks' places go to workers started in their bundles; until those are up the
        job runs on the largest layout the survivors form (``choose_layout``).
        """
        g, t = group, self.job.trainer
        old = g.layout
        g.kill([g.workers[r] for r in failure.ranks])
        # The survivors' chunk calls end once their collectives see the lost ranks' sockets close.
        # A stopped process is killed only after Ray's graceful-exit timeout (about 5 s), so the
        # wait allows for that on top of a step.
        done, _ = ray.wait(chunk.metrics, num_returns=len(chunk.metrics), timeout=t.step_timeout_s + 15.0)
        stuck = {r for r, ref in enumerate(chunk.metrics) if ref not in done}
        silent = set(g.unresponsive(timeout_s=5.0))  # dead, or stopped
        self.log(f"healing: lost {sorted(set(failure.ranks))}, stuck {sorted(stuck)}, silent {sorted(silent)}")
        lost = lost_ranks(failure.ranks, stuck, silent)  # a survivor stuck in a collective is replaced too
        _drain(chunk)
        if not lost:
            raise RuntimeError(f"no lost rank found for a {failure.kind.value} failure: a replay would fail alike")
        g.kill([g.workers[r] for r in lost])
        self.spares += [self._spawn(g, g.bundles[r]) for r in lost]
        members = [Member(g.workers[r], g.bundles[r], r) for r in range(old.world) if r not in lost]
        layout = self._wait_for_layout(g, len(members))
        ready = self.ready_spares(g)[: max(0, layout.world - len(members))]
        members += [Member(s.actor, s.bundle, None) for s in ready]
        try:
            self.reform(g, members, old, layout, reason="lost")
        except Exception as exc:
            if self.previous is None:
                raise
            # The newest commit's second copy may not have reached its keeper before the node
            # holding the first went: heal from the commit before, one chunk further back.
            step = self.previous.step
            self.log(f"healing from the newest commit failed ({type(exc).__name__}); using the one of step {step}")
            self.committed, self.previous = self.previous, None
            rewind(self.committed.step)
            self.reform(g, members, old, layout, reason="lost")
        return lost

    def _wait_for_layout(self, group: WorkerGroup, survivors: int) -> Layout:
        """The layout the survivors and the spares that are up form; below cluster.min_workers,
        wait for more (raises CapacityError after trainer.capacity_timeout_s)."""
        t, c = self.job.trainer, self.job.cluster
        deadline = time.monotonic() + t.capacity_timeout_s
        while (layout := self.layout_for(survivors + len(self.ready_spares(group)))) is None:
            if time.monotonic() > deadline:
                raise CapacityError(
                    f"{survivors} worker(s) left, fewer than cluster.min_workers={c.min_workers}, and no "
                    f"replacement could be placed within trainer.capacity_timeout_s={t.capacity_timeout_s:g} s"
                )
            time.sleep(0.5)
        return layout

    def layout_for(self, available: int) -> Layout | None:
        return choose_layout(available, self.layout, min_workers=self.job.cluster.min_workers)

    # -- spares, re-form, grow ---------------------------------------------------------------

    @staticmethod
    def _spawn(group: WorkerGroup, bundle: int) -> Spare:
        actor = group.spawn(bundle)
        return Spare(actor, bundle, actor.pid.remote())

    def ready_spares(self, group: WorkerGroup) -> list[Spare]:
        """The spares that are up. A dead one (its node gone) is replaced by a new one in its bundle."""
        refs = [s.ready for s in self.spares]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        up, spares = [], []
        for spare in self.spares:
            if spare.ready in ready:
                try:
                    ray.get(spare.ready)
                    up.append(spare)
                except Exception:
                    spare = self._spawn(group, spare.bundle)
            spares.append(spare)
        self.spares = spares
        return up

    def reform(self, group: WorkerGroup, members: list[Member], old: Layout, layout: Layout, reason: str) -> None:
        """Make ``members`` (survivors first) the ranks of ``layout``, each restoring its new rank's
        state from the commit."""
        chosen = assign_ranks([m.old_rank for m in members], old, layout)
        alive = {m.old_rank for m in members if m.old_rank is not None}
        step = self.committed.step
        pieces = [
            [
                ref
                for r in snapshot_sources(rank, layout, members[i].old_rank, old, alive, old.fsdp)
                for ref in self.committed.refs[r]
            ]
            for rank, i in enumerate(chosen)
        ]
        workers = [members[i].actor for i in chosen]
        idle = [m for i, m in enumerate(members) if i not in chosen]
        steps = group.reform(workers, [members[i].bundle for i in chosen], layout, pieces=pieces)
        # Only now that the new group stands: the spares it took in are no longer spares, and
        # survivors left out of the layout stay warm, as spares for growing back.
        used = {id(w) for w in workers}
        self.spares = [s for s in self.spares if id(s.actor) not in used]
        self.spares += [Spare(m.actor, m.bundle, m.actor.pid.remote()) for m in idle if m.old_rank is not None]
        if set(steps) != {step}:
            raise RuntimeError(f"ranks restored steps {steps}, not the committed step {step}")
        # The same cut, in the new layout: a failure before the next commit heals too.
        self.committed = Commit(step, pieces)
        self.previous = None  # in the old layout's ranks: no longer usable
        self.last_resize = time.monotonic()
        if (layout.world, layout.ep) != (old.world, old.ep):
            self.runlog.announce("resized", from_world=old.world, to_world=layout.world, from_ep=old.ep,
                                 to_ep=layout.ep, reason=reason, step=step)  # fmt: skip
            self.log(f"resized ({reason}): {old.world} -> {layout.world} workers, ep {old.ep} -> {layout.ep}")

    def growth(self, group: WorkerGroup) -> tuple[Layout, tuple[Spare, ...]] | None:
        """At a step boundary, at most every cluster.resize_check_s: the larger layout the spares
        that are up allow, and the spares that join it; None when the group stays as it is."""
        world = group.layout.world
        if world >= self.layout.world or time.monotonic() - self.last_resize < self.job.cluster.resize_check_s:
            return None
        self.last_resize = time.monotonic()
        ready = self.ready_spares(group)
        layout = self.layout_for(world + len(ready))
        if not ready or layout is None or layout.world <= world:
            return None
        return layout, tuple(ready[: layout.world - world])

    def grow(self, group: WorkerGroup, layout: Layout, joining: tuple[Spare, ...]) -> None:
        members = [Member(w, b, r) for r, (w, b) in enumerate(zip(group.workers, group.bundles))]
        members += [Member(s.actor, s.bundle, None) for s in joining]
        self.reform(group, members, group.layout, layout, reason="grew")


def _drain(chunk: Chunk) -> None:
    """Read the errors of a failed chunk's finished tasks (Ray prints every error never read); the
    snapshots of the ranks that did finish are not fetched (they are whole rank states)."""
    for m, s in zip(chunk.metrics, chunk.snapshots):
        try:
            ray.get(m, timeout=0)
        except Exception:
            try:
                ray.get(s, timeout=0)
            except Exception:
                pass
