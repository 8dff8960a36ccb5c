"""Fault-tolerance and controller-overhead figures for the embedded CPU default.

    python jobs/bench_cluster.py                 # both measurements, default job (tiny, 2 workers)
    python jobs/bench_cluster.py --steps 100

1. Controller overhead: the same steps (default config, no evaluation) run by the Ray
   controller with its TrainWorker actors, and by two plain gloo processes without Ray
   (``moe_cluster.train.launch``), interleaved; steady-state seconds per step, startup excluded.
2. Recovery: the default job with one worker SIGKILLed at a random step; recovery time (failure
   detected -> next step completed) and steps replayed, from the controller's events.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import tempfile
import threading
import time

import ray

from moe_cluster.cluster import Controller
from moe_cluster.config import JobConfig
from moe_cluster.train import Trainer
from moe_cluster.train.launch import launch


def default_job(run_dir: str, steps: int) -> JobConfig:
    job = JobConfig()  # the schema defaults are the embedded CPU default (conf/ mirrors them)
    job.trainer.max_steps = steps
    job.trainer.eval_every = 0
    job.trainer.optim.decay_steps = steps
    job.logger.console = False
    job.run_dir = run_dir
    return job


def _plain_rank(job: JobConfig, warmup: int) -> float:
    trainer = Trainer(job.model, job.trainer, job.data, ep=job.parallel.ep, checkpoint_dir=job.run_dir)
    for _ in range(warmup):
        trainer.train_step()
    start = time.perf_counter()
    while trainer.step < job.trainer.max_steps:
        trainer.train_step()
        if job.trainer.checkpoint_every and trainer.step % job.trainer.checkpoint_every == 0:
            trainer.save_checkpoint()
    return (time.perf_counter() - start) / (job.trainer.max_steps - warmup)


def plain_seconds_per_step(steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        job = default_job(d, steps)
        return launch(job.cluster.num_workers, _plain_rank, job, warmup)[0]


def ray_seconds_per_step(steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        controller = Controller(default_job(d, steps), d)
        marks = {}

        def on_metrics(m):
            if m["step"] == warmup:
                marks["start"] = time.perf_counter()
            marks["end"] = time.perf_counter()

        controller.on_metrics.append(on_metrics)
        controller.run()
        return (marks["end"] - marks["start"]) / (steps - warmup)


def recovery(steps: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        controller = Controller(default_job(d, steps), d)
        kill_at = random.Random(seed).randint(steps // 4, steps // 2)
        thread = threading.Thread(target=lambda: setattr(controller, "summary", controller.run()))
        thread.start()
        while controller.step < kill_at:
            time.sleep(0.01)
        logged = controller.step  # the log advances a chunk (<= 10 steps) at a time
        os.kill(controller.group.pids()[1], signal.SIGKILL)
        thread.join()
        (rec,) = controller.summary["recoveries"]
        return {"logged_at_kill": logged, **rec}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--recoveries", type=int, default=3)
    args = p.parse_args(argv)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    plain, via_ray = [], []
    for _ in range(args.reps):
        plain.append(plain_seconds_per_step(args.steps, args.warmup))
        via_ray.append(ray_seconds_per_step(args.steps, args.warmup))
    overhead = [r / q - 1 for r, q in zip(via_ray, plain)]
    print(f"seconds/step: plain processes {statistics.median(plain):.4f}, Ray controller {statistics.median(via_ray):.4f}")
    print(f"controller overhead per step: median {100 * statistics.median(overhead):+.1f}% "
          f"(runs: {', '.join(f'{100 * o:+.1f}%' for o in overhead)})")
    for i in range(args.recoveries):
        r = recovery(args.steps, seed=i)
        print(f"SIGKILL with {r['logged_at_kill']} steps logged: recovery {r['recovery_s']:.2f} s, "
              f"replayed {r['replayed_steps']} steps (resumed at step {r['resumed_at']})")


if __name__ == "__main__":
    main()
