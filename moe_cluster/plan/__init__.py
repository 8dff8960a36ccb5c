"""The memory planner: what one rank of a job will hold, in bytes, before anything starts.

    params.py       the parameter tensors, from the model itself built on the meta device
    activations.py  what autograd keeps from a micro-batch's forward, op by op
    memory.py       the arithmetic: model state, activations, transient buffers -> MemoryPlan
    machine.py      what one rank may use: GPU memory, Ray's resources, this machine
    suggest.py      the knobs that would make a job fit, each re-planned
    report.py       the table, the --json object, the refusal

The arithmetic reads the job's ``Layout`` (moe_cluster/parallel/layout.py), built once by
``moe_cluster.config.job_layout``. Importing this package imports torch (the meta-device model):
the CLI imports it inside the commands that plan; the launcher (cluster/launch.py) calls
``check_memory``. docs/scaling.md says how it
counts and how it was checked against measured bytes.
"""

from __future__ import annotations

from ..config import JobConfig
from ..parallel.layout import Layout
from .activations import Precision, activation_bytes, expert_rows
from .machine import GB, memory_budget, runs_here
from .memory import AUTOCAST_COPIES, LOAD_IMBALANCE, MemoryPlan, Workload, plan_job
from .params import Param, model_params
from .report import format_plan, refusal, to_json
from .suggest import KNOBS, suggestions


def check_memory(
    cfg: JobConfig, cluster_resources: dict | None = None, *, here: bool, layout: Layout | None = None
) -> MemoryPlan | None:
    """The job's plan, or ``ValueError`` with the refusal (the plan, and what would make it fit)
    when it does not fit; None while ``model.vocab_size`` is the data's, not read yet (the job is
    planned where it runs, once assemble has read it). ``here``: the workers run on this machine
    (``runs_here``), so its memory is the budget of CPU workers."""
    if cfg.model.vocab_size is None:
        return None
    plan = plan_job(cfg, cluster_resources, here=here, layout=layout)
    if not plan.fits:
        raise ValueError(refusal(cfg, plan, cluster_resources, here=here))
    return plan


__all__ = [
    "AUTOCAST_COPIES", "GB", "KNOBS", "LOAD_IMBALANCE", "MemoryPlan", "Param", "Precision", "Workload",
    "activation_bytes", "check_memory", "expert_rows", "format_plan", "memory_budget", "model_params", "plan_job",
    "refusal", "runs_here", "suggestions", "to_json",
]  # fmt: skip
