"""wandb: one run per job, on the driver. Offline unless an API key or ``mode=online`` is given.

The run's id is kept in ``<run dir>/wandb_run_id``, so a job that recovers (same driver) or is
relaunched with ``resume=true`` continues the same wandb run. Offline runs live in
``<run dir>/wandb/``; upload them later with ``wandb sync <run dir>/wandb/offline-run-*``.

Replayed steps after a recovery are not logged again: wandb keeps one value per step and the
replay reproduces the lost steps' values exactly (the fault tests check this bitwise).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

SCALARS = ("loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss",
           "dropped_tokens", "recovery_s", "replayed_steps", "world_size")  # fmt: skip


def resolve_mode(mode: str | None) -> str:
    """``online`` with an API key (or when asked for), else ``offline``; ``disabled`` stays."""
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger:
    """Controller observer: config at start, scalars per step, heatmaps, failure/recovery events."""

    def __init__(self, job, run_dir: str | Path):
        import wandb

        self.wandb = wandb
        self.run_dir = Path(run_dir)
        cfg = job.logger.wandb
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=resolve_mode(cfg.mode),
            config=dataclasses.asdict(job),
        )
        self.last_step = self.run.step if self.run.resumed else 0

    def on_metrics(self, r: dict) -> None:
        step = r["step"]
        if step <= self.last_step:  # a replayed step: wandb already holds its (identical) values
            return
        data = {k: r[k] for k in SCALARS if k in r}
        heatmap = self.run_dir / f"expert_load_step{step:08d}.png"
        if heatmap.exists():
            data["expert_load"] = self.wandb.Image(str(heatmap))
        self.run.log(data, step=step)
        self.last_step = step

    def on_event(self, e: dict) -> None:
        kind = e["event"]
        if kind == "failure":
            self.run.log({"event/failure": 1, "event/failure_step": e["step"]}, commit=False)
        elif kind == "recovered":
            self.run.summary["last_recovery_s"] = e["recovery_s"]
            self.run.summary["recoveries"] = self.run.summary.get("recoveries", 0) + 1
            key = f"recoveries_{e.get('source', 'checkpoint')}"
            self.run.summary[key] = self.run.summary.get(key, 0) + 1
        elif kind == "resized":
            self.run.log({"event/world_size": e["to_world"]}, commit=False)
        elif kind in ("finished", "failed"):
            loss_curve = self.run_dir / "loss_curve.png"
            if loss_curve.exists():
                self.run.summary["loss_curve"] = self.wandb.Image(str(loss_curve))
            self.run.finish(exit_code=0 if kind == "finished" else 1)
            # finish() can return before wandb's service has written the run's last records
            # (an offline run file read right after it may lack its history); teardown waits
            # for the service to flush and exit, so the run is whole when the job returns.
            self.wandb.teardown()
