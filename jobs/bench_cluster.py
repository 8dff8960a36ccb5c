"""Fault-tolerance and controller-overhead figures for the embedded CPU default.

    python jobs/bench_cluster.py                      # everything: overhead, recoveries, resize throughput
    python jobs/bench_cluster.py --kills 5 --steps 200

1. Overhead: the default job (tiny, 2 workers, no evaluation) under trainer.recovery=peers (a
   snapshot and a commit after every step) and under trainer.recovery=checkpoint (chunks of 10
   steps, no snapshots), interleaved; steady-state seconds per step, startup excluded.
2. Recovery: for each mode, on 2 and on 4 workers, one run with ``--kills`` SIGKILLs of a random
   rank at random steps (seeded; the first after the first checkpoint), each after the job is back
   on all its workers. Per failure: recovery time (failure detected -> next step completed, from
   the ``recovered`` event), steps replayed, and the time lost (recovery + replay x step time).
3. Resize throughput: tokens/s of the 4-worker job while it ran on 2 workers against its tokens/s
   on 4 (from metrics.jsonl), with the ratio the issue asks for (>= 0.9 x 2/4).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray

from moe_cluster.cluster import Controller
from moe_cluster.config import JobConfig


def default_job(run_dir: str, steps: int, recovery: str, workers: int = 2) -> JobConfig:
    job = JobConfig()  # the schema defaults are the embedded CPU default (conf/ mirrors them)
    job.trainer.max_steps = steps
    job.trainer.eval_every = 0
    job.trainer.optim.decay_steps = steps
    job.trainer.recovery = recovery
    job.trainer.max_failures = 100
    job.cluster.num_workers = workers
    job.cluster.resize_check_s = 1.0
    job.logger.console = False
    job.run_dir = run_dir
    return job


def seconds_per_step(recovery: str, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        controller = Controller(default_job(d, steps, recovery), d)
        marks = {}

        def on_metrics(m):
            if m["step"] == warmup:
                marks["start"] = time.perf_counter()
            marks["end"] = time.perf_counter()

        controller.on_metrics.append(on_metrics)
        controller.run()
        return (marks["end"] - marks["start"]) / (steps - warmup)


def _events(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def recoveries(recovery: str, workers: int, kills: int, steps: int, seed: int) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        job = default_job(d, steps, recovery, workers)
        controller = Controller(job, d)
        thread = threading.Thread(target=lambda: setattr(controller, "summary", controller.run()), daemon=True)
        thread.start()
        next_kill = job.trainer.checkpoint_every + rng.randint(1, 10)  # the first after the first checkpoint
        for _ in range(kills):
            while controller.step < next_kill or controller.group is None or len(controller.group.workers) < workers:
                if not thread.is_alive():
                    raise RuntimeError("the job ended before every kill")
                time.sleep(0.01)
            done = sum(e["event"] == "recovered" for e in _events(d))
            os.kill(controller.group.pids()[rng.randrange(workers)], signal.SIGKILL)
            while sum(e["event"] == "recovered" for e in _events(d)) == done:
                time.sleep(0.05)
            next_kill = controller.step + rng.randint(15, 30)
        thread.join()
        records = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(r["seconds"] for r in records)
        recs = [e for e in _events(d) if e["event"] == "recovered"]
        by_world = {}
        for r in records:
            by_world.setdefault(r["world_size"], []).append(r["tokens_per_s"])
        return {
            "recovery_s": [r["recovery_s"] for r in recs],
            "replayed": [r["replayed_steps"] for r in recs],
            "lost_s": [r["recovery_s"] + r["replayed_steps"] * step_s for r in recs],
            "sources": sorted({r["source"] for r in recs}),
            "tokens_per_s": {w: statistics.median(v) for w, v in by_world.items()},
        }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120, help="steps of each overhead run")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--kill-steps", type=int, default=400, help="steps of each recovery run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    peers, plain = [], []
    for _ in range(args.reps):
        peers.append(seconds_per_step("peers", args.steps, args.warmup))
        plain.append(seconds_per_step("checkpoint", args.steps, args.warmup))
    overhead = [a / b - 1 for a, b in zip(peers, plain)]
    print(f"seconds/step: recovery=peers {statistics.median(peers):.4f}, recovery=checkpoint {statistics.median(plain):.4f}")
    print(f"snapshot + commit overhead per step: median {100 * statistics.median(overhead):+.1f}% "
          f"(runs: {', '.join(f'{100 * o:+.1f}%' for o in overhead)})")  # fmt: skip
    print("| mode | workers | failures | recovery s (median, max) | replayed (max) | time lost s (median) | sources |")
    print("|---|---|---|---|---|---|---|")
    for recovery in ("peers", "checkpoint"):
        for workers in (2, 4):
            r = recoveries(recovery, workers, args.kills, args.kill_steps, args.seed)
            print(f"| {recovery} | {workers} | {len(r['recovery_s'])} | {statistics.median(r['recovery_s']):.2f}, "
                  f"{max(r['recovery_s']):.2f} | {max(r['replayed'])} | {statistics.median(r['lost_s']):.2f} | "
                  f"{', '.join(r['sources'])} |", flush=True)  # fmt: skip
            if recovery == "peers" and workers == 4 and 2 in r["tokens_per_s"]:
                t = r["tokens_per_s"]
                print(f"    4-worker job: {t[4]:,.0f} tokens/s on 4 workers, {t[2]:,.0f} on 2: ratio {t[2] / t[4]:.2f} "
                      f"(target >= {0.9 * 2 / 4:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
