"""A small job for the Ray tests, and helpers to run it and read its logs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from pathlib import Path

from moe_cluster.config import ClusterConfig, JobConfig, TrainerConfig
from moe_cluster.model import ModelConfig, MoEConfig
from moe_cluster.train import DataConfig, OptimConfig

# The same job as Hydra overrides, for the tests that launch jobs/train.py.
OVERRIDES = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "model.dense_hidden_dim=64",
    "model.moe.num_experts=4", "model.moe.hidden_dim=64",
    "trainer.max_steps=30", "trainer.global_batch_size=8", "trainer.seq_len=32", "trainer.eval_every=0",
    "trainer.checkpoint_every=5", "trainer.optim.lr=0.01", "trainer.optim.warmup_steps=2",
    "trainer.optim.decay_steps=30", "data.max_bytes=400000", "logger.console=false",
]  # fmt: skip


def small_job(run_dir, **trainer_kw) -> JobConfig:
    job = JobConfig()
    job.model = ModelConfig(
        dim=64, n_layers=2, n_heads=4, max_seq_len=32, dense_hidden_dim=64,
        moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=64),
    )  # fmt: skip
    trainer = dict(
        max_steps=30, global_batch_size=8, seq_len=32, eval_every=0, checkpoint_every=5,
        step_timeout_s=30.0, capacity_timeout_s=60.0,
        optim=OptimConfig(lr=0.01, warmup_steps=2, decay_steps=30),
    )  # fmt: skip
    trainer.update(trainer_kw)
    job.trainer = TrainerConfig(**trainer)
    job.data = DataConfig(max_bytes=400_000)
    job.cluster = ClusterConfig(num_workers=2)
    job.parallel.ep = 2
    job.logger.console = False
    job.run_dir = str(run_dir)
    return job


class Background:
    """Run ``fn`` in a thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._value = fn()
        except BaseException as exc:  # handed to the test thread
            self._error = exc

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the job did not end within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


def seeded_random(test: str) -> random.Random:
    """The random source of a fault test: its seed is printed (pytest shows it with a failure), and
    MOE_FAULT_SEED=<seed> replays the same kill steps."""
    seed = int(os.environ.get("MOE_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{test}: seed {seed} (replay with MOE_FAULT_SEED={seed})")
    return random.Random(seed)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def losses(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl must hold one line per step, got {steps}"
    return {r["step"]: r["loss"] for r in records}


_REFERENCES: dict[str, dict[int, float]] = {}


def reference_losses(name: str, make_job, tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted run of ``make_job(run_dir)``, run once per session on the Ray
    instance connected then. The fault tests compare their runs with it; where the workers are
    placed (one node or several, PACK or SPREAD) does not change the math, so one run serves all."""
    from moe_cluster.cluster import Controller

    if name not in _REFERENCES:
        run = tmp_path_factory.mktemp(f"reference-{name}")
        assert Controller(make_job(run), run, chunk_steps=2).run()["failures"] == 0
        _REFERENCES[name] = losses(run)
    return _REFERENCES[name]


def events(run_dir) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def local_cluster(nodes: int):
    """A simulated multi-node Ray cluster (ray.cluster_utils.Cluster), with Ray connected to it: a
    head that runs no workers and ``nodes`` one-CPU nodes, so each worker has a node of its own."""
    import ray
    from ray.cluster_utils import Cluster

    # No metrics: at ray.shutdown() the driver flushes them to an agent that may have gone with a
    # removed node, and waits up to 10 s for it. The metrics tests run on a plain local instance.
    head = {"num_cpus": 0, "_system_config": {"enable_metrics_collection": False}}
    c = Cluster(initialize_head=True, head_node_args=head)
    added = [c.add_node(num_cpus=1) for _ in range(nodes)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, added
    finally:
        ray.shutdown()
        # The test is over: its nodes go at once (a graceful stop waits on each raylet's workers,
        # seconds per node), the head last.
        for node in list(c.worker_nodes):
            c.remove_node(node, allow_graceful=False)
        c.shutdown()
