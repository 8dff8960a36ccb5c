"""WorkerGroup: the TrainWorker actors of a job, in one placement group, driven together."""

from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import JobConfig
from ..parallel.layout import Layout
from .failures import CapacityError, Hang, Lost, is_allocation_failure
from .worker import TrainWorker


class WorkerGroup:
    """The job's workers: one placement group of ``cluster.num_workers`` bundles, and the actors in it.

    ``workers[r]`` is rank r of the current layout; ``bundles[r]`` its bundle. After a failure the
    group shrinks in place (``reform`` with the survivors) and grows back with actors started in
    the freed bundles (``spawn``), which Ray places as soon as their bundle has a node again.
    """

    def __init__(self, job: JobConfig, checkpoint_dir: str, chunk_steps: int, log=print):
        self.job, self.checkpoint_dir, self.chunk_steps, self.log = job, checkpoint_dir, chunk_steps, log
        self.pg = None
        self.workers: list = []
        self.bundles: list[int] = []
        self._pids: list[int] = []
        self.layout: Layout | None = None
        self.nodes: list[str] = []  # the Ray node of each rank
        self.chunks_run = 0

    def _bundle(self) -> dict:
        c = self.job.cluster
        bundle = {"CPU": c.cpus_per_worker}
        if c.use_gpu:
            bundle["GPU"] = 1
        return bundle

    def spawn(self, bundle: int):
        """A new TrainWorker in ``bundle`` (it starts when Ray can place the bundle)."""
        c = self.job.cluster
        return ray.remote(TrainWorker).options(
            num_cpus=c.cpus_per_worker,
            num_gpus=1 if c.use_gpu else 0,
            max_restarts=0,  # the controller replaces lost workers itself
            max_concurrency=2,  # `progress` answers while `run` is busy (hung-worker detection)
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle),
        ).remote(self.job, bundle, c.num_workers, self.checkpoint_dir)

    def pg_timeout(self) -> float:
        # The process group's own timeout outlasts a whole chunk's, so a hang is seen by the
        # controller (which finds and kills the silent rank) rather than as errors on survivors.
        t = self.job.trainer
        return t.step_timeout_s * self.chunk_steps + t.startup_grace_s

    def start(self, layout: Layout, checkpoint_path: str | None) -> int:
        """Place the workers of ``layout`` (the job's: ``config.job_layout``), form the process
        group, load ``checkpoint_path`` (None: start fresh); returns the step the workers are at."""
        c, t = self.job.cluster, self.job.trainer
        self.pg = placement_group([self._bundle()] * layout.world, strategy=c.placement_strategy)
        self._wait_for_capacity(t.capacity_timeout_s)
        workers = [self.spawn(bundle) for bundle in range(layout.world)]
        steps = self.reform(workers, list(range(layout.world)), layout, checkpoint_path=checkpoint_path)
        if len(set(steps)) != 1:
            raise RuntimeError(f"workers resumed at different steps {steps}: the checkpoint directory must be shared")
        return steps[0]

    def reform(self, workers: list, bundles: list[int], layout: Layout, checkpoint_path=None, pieces=None) -> list[int]:
        """Make ``workers`` the ranks of ``layout`` (they leave any group they were in), each
        loading ``pieces[r]`` (a list of snapshot ObjectRefs) or ``checkpoint_path``; returns their steps."""
        pids = ray.get([w.pid.remote() for w in workers], timeout=self._setup_timeout())
        nodes = ray.get([w.node_id.remote() for w in workers], timeout=self._setup_timeout())
        timeout = self.pg_timeout()
        addr, port = ray.get(workers[0].rendezvous_address.remote(layout.world, timeout), timeout=self._setup_timeout())
        joins = [
            w.join.remote(addr, port, rank, layout, timeout, checkpoint_path, pieces[rank] if pieces else None)
            for rank, w in enumerate(workers)
        ]
        steps = ray.get(joins, timeout=self._setup_timeout())
        self.workers, self.bundles, self._pids, self.layout = list(workers), list(bundles), pids, layout
        self.nodes = nodes
        self.chunks_run = 0  # the new group's first chunk gets trainer.startup_grace_s
        return steps

    def _setup_timeout(self) -> float:
        return max(120.0, self.job.trainer.step_timeout_s)

    def _wait_for_capacity(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready = self.pg.ready()
        while True:
            done, _ = ray.wait([ready], timeout=min(10.0, max(0.1, deadline - time.monotonic())))
            if done:
                return
            if time.monotonic() >= deadline:
                need = f"{self.job.cluster.num_workers} x {self._bundle()}"
                raise CapacityError(
                    f"the cluster could not place {need} within trainer.capacity_timeout_s={timeout_s:g} s "
                    f"(available: {ray.available_resources()}); add nodes, or lower cluster.num_workers"
                )
            self.log(
                f"waiting for capacity: {self.job.cluster.num_workers} x {self._bundle()} "
                f"({deadline - time.monotonic():.0f} s left; available {ray.available_resources()})"
            )

    def run(self, num_steps: int, wards: list | None = None, snapshot: bool = True) -> tuple[list, list]:
        """Start ``num_steps`` steps on every worker; returns (metrics refs, snapshot refs), rank order.

        ``wards[r]``: the snapshot refs rank r fetches and holds while it computes (a second copy
        of a neighbour's state, on rank r's node), or None.
        """
        self.chunks_run += 1
        pairs = [
            w.run.options(num_returns=2).remote(num_steps, wards[r] if wards else None, snapshot)
            for r, w in enumerate(self.workers)
        ]
        return [m for m, _ in pairs], [s for _, s in pairs]

    def results(self, refs: list, num_steps: int, timeout_s: float) -> list:
        """The results of ``run``'s metrics ``refs``, rank order. A failure is named: ``Hang`` (no
        result within ``timeout_s``, with the ranks that stopped answering), ``Lost`` (with the
        ranks whose process is gone), or the error of a rank that ran out of memory, whatever its
        peers' collectives said first; else the first error, in rank order."""
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            silent = self.unresponsive(timeout_s=5.0)
            who = f"rank(s) {silent} stopped answering" if silent else "every rank answers, so a collective is stuck"
            raise Hang(
                f"no result for {num_steps} step(s) within {timeout_s:g} s (trainer.step_timeout_s per step): {who}",
                silent,
            ) from None
        except (RayActorError, RayTaskError) as exc:
            # The first error in rank order may be a survivor's collective failing: name the dead.
            dead = self.failed_ranks(refs, wait_s=2.0)
            if dead:
                raise Lost(exc, dead) from exc
            # A rank that ran out of memory is the cause, whatever its peers' collectives said first.
            raise _allocation_failure(refs) or exc

    def unresponsive(self, timeout_s: float) -> list[int]:
        """Ranks whose process does not answer a ``progress`` call within ``timeout_s`` (stopped,
        or gone). A rank busy in a step or blocked in a collective still answers."""
        refs = [w.progress.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        silent = []
        for rank, ref in enumerate(refs):
            if ref not in ready:
                silent.append(rank)
                continue
            try:
                ray.get(ref)
            except Exception:  # the actor is dead
                silent.append(rank)
        return silent

    def failed_ranks(self, refs: list, wait_s: float) -> list[int]:
        """Ranks whose chunk ended because their process is gone (dead actor), from ``run``'s refs."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        dead = []
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except RayActorError:
                    dead.append(rank)
                except Exception:  # a step error, often a survivor's collective failing: not the cause
                    pass
        return dead

    def pids(self) -> list[int]:
        """The workers' process ids (read at start: an actor busy in a chunk answers no call)."""
        return list(self._pids)

    def kill(self, workers: list) -> None:
        for w in workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass

    def shutdown(self, also: list = ()) -> None:
        """Kill every worker (stuck or not, and ``also``: spares) and release the placement group."""
        self.kill([*self.workers, *also])
        self.workers = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


def _allocation_failure(refs: list) -> RayTaskError | None:
    """The first finished chunk, in rank order, that failed allocating memory."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in refs:
        if ref in ready:
            try:
                ray.get(ref, timeout=0)
            except RayTaskError as exc:
                if is_allocation_failure(exc.cause):
                    return exc
            except Exception:  # a dead actor, or another error: not this one's business
                pass
    return None
