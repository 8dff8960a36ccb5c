"""The plan in words: the table ``moe-cluster plan`` prints, its ``--json`` object, and a refusal."""

from __future__ import annotations

from ..config import JobConfig
from .machine import GB
from .memory import MemoryPlan
from .suggest import suggestions


def to_json(plan: MemoryPlan) -> dict:
    """The plan as one JSON-able object (``moe-cluster plan --json``)."""
    per_rank = {k: getattr(plan, k) for k in ("params", "grads", "optimizer", "activations", "transient", "total")}
    lay, work = plan.layout, plan.workload
    # Outside tools read these keys: the same as before the planner took the job's Layout.
    layout = {
        "world": lay.world, "ep": lay.ep, "fsdp": lay.fsdp, "engine": work.engine, "zero_stage": work.zero_stage,
        "gpu": work.gpu, "micro_batch": lay.micro_batch, "seq_len": work.seq_len, "grad_accum": lay.grad_accum,
        "activation_checkpointing": work.activation_checkpointing, "load_imbalance": work.load_imbalance,
    }  # fmt: skip
    return {
        "per_rank_bytes": per_rank,
        "gpu_memory_bytes": plan.budget_bytes if work.gpu else None,
        "host_memory_bytes": None if work.gpu else plan.budget_bytes,
        "budget": plan.budget_source,
        "fits": plan.fits,
        "layout": layout,
        "parameters": plan.model,
        "breakdown": plan.breakdown,
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: MemoryPlan) -> str:
    """A table of the per-rank figures, what each is made of, and the verdict."""
    lay, work, mc = plan.layout, plan.workload, plan.model
    unit, scale = ("GB", GB) if plan.total >= GB else ("MB", 10**6)

    def size(n: float) -> str:
        return f"{n / scale:9.2f}"

    where = "GPU (bf16 compute, fp32 master weights)" if work.gpu else "CPU (fp32)"
    engine = "native, fsdp " + ("on" if lay.fsdp else "off")
    if work.engine == "deepspeed":
        engine = f"deepspeed ZeRO-{work.zero_stage}"
    lines = [
        f"memory plan: {_count(mc['total'])} parameters ({_count(mc['expert'])} in experts), {lay.world} rank(s), "
        f"ep={lay.ep}, {engine}, {where}",
        f"micro-batch {lay.micro_batch} x {work.seq_len} tokens (grad_accum {lay.grad_accum}), activation "
        f"checkpointing {work.activation_checkpointing}, expert load allowance {work.load_imbalance:g}",
        "",
        f"{'per rank':<13}{unit:>9}",
    ]
    for key in ("params", "grads", "optimizer", "activations", "transient"):
        lines.append(f"  {key:<11}{size(getattr(plan, key))}" + ("   the largest of:" if key == "transient" else ""))
        lines += [f"{'':<13}{size(n)}   {what}" for what, n in plan.breakdown[key].items()]
    if plan.budget_bytes is None:
        verdict = f"of unknown memory: {plan.budget_source}"
    else:
        fits = "fits" if plan.fits else "does NOT fit"
        verdict = f"of {plan.budget_bytes / scale:.2f} {unit} ({plan.budget_source}): {fits}"
    lines.append(f"  {'total':<11}{size(plan.total)}   {verdict}")
    return "\n".join(lines)


def refusal(cfg: JobConfig, plan: MemoryPlan, cluster_resources: dict | None = None, *, here: bool = False) -> str:
    """Why a job is refused: the plan, and what would make it fit."""
    lines = [
        f"the job does not fit in memory: {plan.total / GB:.1f} GB per rank, {plan.budget_bytes / GB:.1f} GB available "
        f"({plan.budget_source})",
        format_plan(plan),
    ]
    fixes = suggestions(cfg, plan, cluster_resources, here=here)
    if fixes:
        lines.append("what would change it (each re-planned):")
        lines += [f"  {fix}" for fix in fixes]
    if not any(fix.endswith("(fits)") for fix in fixes):
        whole = plan.model["total"] * 16
        lines.append(
            f"no change tried here fits: the model's parameters, gradients and AdamW state take {whole / GB:.1f} GB "
            f"over the whole job (16 bytes a parameter); give the workers more memory (more nodes, GPUs: "
            f"cluster=remote cluster.use_gpu=true), or choose a smaller model"
        )
    lines.append("try a change with `moe-cluster plan <overrides>` (nothing starts)")
    return "\n".join(lines)
