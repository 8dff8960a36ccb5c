"""Connect to Ray (or start an embedded instance), validate the job, run the controller."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from ..config import JobConfig, assemble, job_layout, validate
from ..auth import auth_token, plain_http_token_error
from ..observe import PlotWriter, RayMetrics, WandbLogger
from ..plan import check_memory, runs_here
from .controller import Controller
from .network import local_addresses


def connect(job: JobConfig) -> None:
    """``cluster.address`` or RAY_ADDRESS joins an existing cluster; otherwise an embedded one starts."""
    if ray.is_initialized():
        return
    c = job.cluster
    address = c.address or os.environ.get("RAY_ADDRESS")
    if address:
        # "auto" follows RAY_ADDRESS when it is set (else the cluster `ray start` left on this machine).
        check_token_transport(os.environ.get("RAY_ADDRESS") or address if address == "auto" else address, c.insecure)
        ray.init(address=address, log_to_driver=True)
        return
    need = int(c.num_workers * c.cpus_per_worker + 0.999)
    # address="local": a new instance of our own, never a cluster that an earlier `ray start` left
    # in /tmp/ray/ray_current_cluster (dead or alive, it is not the one this job asked for).
    ray.init(
        address="local", num_cpus=c.local_num_cpus or max(need, 1), num_gpus=None if c.use_gpu else 0,
        include_dashboard=False,
    )  # fmt: skip


def check_token_transport(address: str, insecure: bool) -> None:
    """Refuse, as ``moe-cluster submit`` does, to send Ray's auth token unencrypted beyond this
    machine: ``ray://`` and plain addresses travel in clear unless Ray's TLS is on (RAY_USE_TLS=1).
    This machine's own addresses are fine (a job's driver on the head reaches its GCS at the
    head's address, from RAY_ADDRESS)."""
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
    error = plain_http_token_error(address, bool(auth_token()), insecure or tls, local=local_addresses())
    if error:
        raise ValueError(
            f"cluster.address={address}: refusing to send the cluster's auth token unencrypted beyond this machine: "
            "turn on Ray's TLS (RAY_USE_TLS=1 and its certificates), reach the cluster through an SSH tunnel or "
            "`kubectl port-forward` to 127.0.0.1, or set cluster.insecure=true if this network is trusted"
        )


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
    here = runs_here(job)
    validate(job)  # before Ray: config mistakes cost nothing
    layout = job_layout(job)  # the one layout: planned, then driven by the controller
    check_memory(job, None, here=here, layout=layout)
    controller = Controller(job, job.run_dir, layout=layout)
    # Nor does a run directory that needs resume=true, or that another job holds (its locks are
    # taken here, and kept by controller.run until the job ends).
    controller.check_checkpoints()
    try:
        connect(job)
        resources = ray.cluster_resources()
        validate(job, resources)
        check_memory(job, resources, here=here, layout=layout)
        if job.logger.console:
            controller.on_metrics.append(Progress(job))
        observers = [RayMetrics(job_name=Path(job.run_dir).name)]
        if job.logger.plots:
            observers.append(PlotWriter(job.run_dir))  # before wandb: it uploads the PNGs
        if job.logger.wandb.enabled:
            observers.append(WandbLogger(job, job.run_dir))
    except BaseException:
        controller.release_locks()
        raise
    for o in observers:
        controller.on_metrics.append(o.on_metrics)
        controller.on_event.append(o.on_event)
    return controller.run()
