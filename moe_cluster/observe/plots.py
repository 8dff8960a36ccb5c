"""Pictures people look at: the expert-load heatmap and the loss curve (PNG, matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def expert_load_heatmap(counts_LE: list[list[int]], path: str | Path, step: int) -> Path:
    """Layers x experts, each cell the expert's share of its layer's routed tokens."""
    counts = np.asarray(counts_LE, dtype=np.float64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"expected per-layer expert counts [layers][experts], got shape {counts.shape}")
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * E + 2), max(2.5, 0.4 * L + 1.5)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0 / E, share.max()))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(E) if E <= 32 else range(0, E, max(1, E // 16)))
    ax.set_yticks(range(L))
    ax.set_title(f"expert load, step {step}\nshare of routed tokens (uniform {1 / E:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curve(metrics_path: str | Path, path: str | Path) -> Path:
    """Training loss per step (and validation loss where measured) from metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_path} holds no steps to plot")
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], lw=1, alpha=0.8, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    for r in records:
        if "recovery_s" in r:
            ax.axvline(r["step"], color="red", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss" + (" (dashed: recoveries)" if any("recovery_s" in r for r in records) else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class PlotWriter:
    """Controller observer: a heatmap at each evaluation step, the loss curve when the job ends."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def on_metrics(self, record: dict) -> None:
        if "val_loss" in record and record.get("expert_counts"):
            out = self.run_dir / f"expert_load_step{record['step']:08d}.png"
            expert_load_heatmap(record["expert_counts"], out, record["step"])

    def on_event(self, event: dict) -> None:
        if event["event"] in ("finished", "failed") and (self.run_dir / "metrics.jsonl").exists():
            loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
