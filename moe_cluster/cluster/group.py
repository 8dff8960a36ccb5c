"""WorkerGroup: N TrainWorker actors in one placement group, driven together."""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import JobConfig
from .worker import TrainWorker


class CapacityError(RuntimeError):
    """The cluster could not place every worker within the capacity timeout."""


class WorkerGroup:
    def __init__(self, job: JobConfig, checkpoint_dir: str, chunk_steps: int, log=print):
        self.job, self.checkpoint_dir, self.chunk_steps, self.log = job, checkpoint_dir, chunk_steps, log
        self.pg = None
        self.workers: list = []
        self._pids: list[int] = []
        self.chunks_run = 0

    def _bundle(self) -> dict:
        c = self.job.cluster
        bundle = {"CPU": c.cpus_per_worker}
        if c.use_gpu:
            bundle["GPU"] = 1
        return bundle

    def start(self, checkpoint_path: str | None) -> int:
        """Place the workers, form the process group, load ``checkpoint_path`` (None: start fresh);
        returns the step the workers are at."""
        c = self.job.cluster
        self.pg = placement_group([self._bundle()] * c.num_workers, strategy=c.placement_strategy)
        self._wait_for_capacity(self.job.trainer.capacity_timeout_s)
        actor_cls = ray.remote(TrainWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=c.cpus_per_worker,
                num_gpus=1 if c.use_gpu else 0,
                max_restarts=0,  # the controller restarts the whole group, from a checkpoint
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank
                ),
            ).remote(self.job, rank, c.num_workers, self.checkpoint_dir)
            for rank in range(c.num_workers)
        ]
        self._pids = ray.get([w.pid.remote() for w in self.workers])
        # The process group's own timeout outlasts a whole chunk's, so a hang is seen by the
        # controller (which kills every worker) rather than as errors on some survivors.
        t = self.job.trainer
        pg_timeout = t.step_timeout_s * self.chunk_steps + t.startup_grace_s
        addr, port = ray.get(self.workers[0].rendezvous_address.remote(pg_timeout))
        setups = [w.setup.remote(addr, port, checkpoint_path, pg_timeout) for w in self.workers]
        steps = ray.get(setups, timeout=self._setup_timeout())
        if len(set(steps)) != 1:
            raise RuntimeError(f"workers resumed at different steps {steps}: the checkpoint directory must be shared")
        return steps[0]

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

    def run(self, num_steps: int) -> list:
        """Start ``num_steps`` steps on every worker; returns the object refs (rank order)."""
        self.chunks_run += 1
        return [w.run.remote(num_steps) for w in self.workers]

    def pids(self) -> list[int]:
        """The workers' process ids (read at start: an actor busy in a chunk answers no call)."""
        return list(self._pids)

    def shutdown(self) -> None:
        """Kill every worker (stuck or not) and release the placement group."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
