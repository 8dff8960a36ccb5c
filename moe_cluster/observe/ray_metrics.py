"""Ray dashboard / Prometheus metrics: gauges and counters named ``moe_*``.

They are exported by the Ray node the driver runs on, so the Ray dashboard and any Prometheus
scraping the cluster's metrics port (Grafana: k8s/grafana-dashboard.json) see them.
"""

from __future__ import annotations

import numpy as np


class RayMetrics:
    """Controller observer publishing per-step metrics and failure/recovery counts."""

    def __init__(self, job_name: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("job",)
        self.tags = {"job": job_name}

        def gauge(name, description):
            return Gauge(name, description=description, tag_keys=tags)

        self.step = gauge("moe_step", "Last completed optimizer step.")
        self.loss = gauge("moe_loss", "Training loss (cross-entropy + auxiliary), mean over ranks.")
        self.val_loss = gauge("moe_val_loss", "Validation cross-entropy at the last evaluation.")
        self.tokens_per_s = gauge("moe_tokens_per_second", "Training throughput of the whole job.")
        self.mfu = gauge("moe_mfu", "Model FLOPs utilisation (needs trainer.peak_flops).")
        self.imbalance = gauge("moe_expert_load_imbalance", "Max over mean tokens per expert, worst layer.")
        self.dropped = gauge("moe_dropped_tokens", "Token slots dropped for capacity in the last step.")
        self.last_recovery_s = gauge("moe_last_recovery_seconds", "Failure detected to next step completed.")
        self.world_size = gauge("moe_world_size", "Workers the job runs on now (fewer after a loss, until it grows back).")
        self.restarts = Counter(
            "moe_restarts_total", description="Recoveries of the worker group, by source (peers, checkpoint).",
            tag_keys=("job", "source"),
        )  # fmt: skip
        self.failures = Counter("moe_failures_total", description="Failures seen by the controller.", tag_keys=tags)

    def on_metrics(self, r: dict) -> None:
        self.step.set(r["step"], tags=self.tags)
        self.loss.set(r["loss"], tags=self.tags)
        self.tokens_per_s.set(r["tokens_per_s"], tags=self.tags)
        self.dropped.set(r.get("dropped_tokens", 0), tags=self.tags)
        if "world_size" in r:
            self.world_size.set(r["world_size"], tags=self.tags)
        if "val_loss" in r:
            self.val_loss.set(r["val_loss"], tags=self.tags)
        if "mfu" in r:
            self.mfu.set(r["mfu"], tags=self.tags)
        if r.get("expert_counts"):
            self.imbalance.set(load_imbalance(r["expert_counts"]), tags=self.tags)

    def on_event(self, e: dict) -> None:
        if e["event"] == "failure":
            self.failures.inc(tags=self.tags)
        elif e["event"] == "recovered":
            self.restarts.inc(tags={**self.tags, "source": e.get("source", "checkpoint")})
            self.last_recovery_s.set(e["recovery_s"], tags=self.tags)


def load_imbalance(counts_LE: list[list[int]]) -> float:
    """Max over mean tokens per expert in the worst layer: 1.0 is perfectly balanced."""
    counts = np.asarray(counts_LE, dtype=np.float64)
    mean = np.maximum(counts.mean(1), 1e-9)
    return float((counts.max(1) / mean).max())
