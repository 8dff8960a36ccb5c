"""Observers of a running job: plots and Ray (Prometheus) metrics. Console progress and the
metrics.jsonl / events.jsonl logs are written by the controller itself."""

from .plots import PlotWriter, expert_load_heatmap, loss_curve
from .ray_metrics import RayMetrics, load_imbalance
from .wandb_logger import WandbLogger

__all__ = ["PlotWriter", "RayMetrics", "WandbLogger", "expert_load_heatmap", "load_imbalance", "loss_curve"]
