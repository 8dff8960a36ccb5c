"""Connect to Ray (or start an embedded instance), validate the job, run the controller."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from ..config import JobConfig, assemble, validate
from ..observe import PlotWriter, RayMetrics, WandbLogger
from .controller import Controller


def connect(job: JobConfig) -> None:
    """``cluster.address`` or RAY_ADDRESS joins an existing cluster; otherwise an embedded one starts."""
    if ray.is_initialized():
        return
    c = job.cluster
    address = c.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = int(c.num_workers * c.cpus_per_worker + 0.999)
    # address="local": a new instance of our own, never a cluster that an earlier `ray start` left
    # in /tmp/ray/ray_current_cluster (dead or alive, it is not the one this job asked for).
    ray.init(
        address="local", num_cpus=c.local_num_cpus or max(need, 1), num_gpus=None if c.use_gpu else 0,
        include_dashboard=False,
    )  # fmt: skip


class Progress:
    """One console line per step: step, loss, tokens/s, ETA."""

    def __init__(self, job: JobConfig):
        self.max_steps, self.every = job.trainer.max_steps, job.logger.progress_every
        self.step_s = None  # moving average of seconds per step

    def __call__(self, m: dict) -> None:
        s = m["seconds"]
        self.step_s = s if self.step_s is None else 0.9 * self.step_s + 0.1 * s
        if m["step"] % self.every and m["step"] != self.max_steps and "val_loss" not in m:
            return
        eta = self.step_s * (self.max_steps - m["step"])
        val = f"  val {m['val_loss']:.3f}" if "val_loss" in m else ""
        print(
            f"step {m['step']:>6}/{self.max_steps}  loss {m['loss']:.3f}{val}  "
            f"{m['tokens_per_s']:>8,.0f} tok/s  ETA {eta // 60:.0f}m{eta % 60:02.0f}s",
            flush=True,
        )


def run_job(job: JobConfig) -> dict:
    """Validate, connect, train; returns the controller's summary (raises JobFailed on give-up)."""
    job = assemble(job)
    validate(job)  # before Ray: config mistakes cost nothing
    controller = Controller(job, job.run_dir)
    controller.check_checkpoints()  # nor does a run directory that needs resume=true
    connect(job)
    validate(job, ray.cluster_resources())
    if job.logger.console:
        controller.on_metrics.append(Progress(job))
    observers = [RayMetrics(job_name=Path(job.run_dir).name)]
    if job.logger.plots:
        observers.append(PlotWriter(job.run_dir))  # before wandb: it uploads the PNGs
    if job.logger.wandb.enabled:
        observers.append(WandbLogger(job, job.run_dir))
    for o in observers:
        controller.on_metrics.append(o.on_metrics)
        controller.on_event.append(o.on_event)
    return controller.run()
