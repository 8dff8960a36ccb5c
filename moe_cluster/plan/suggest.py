"""What would make a job fit: one knob changed at a time, each change re-planned."""

from __future__ import annotations

import dataclasses

from ..config import JobConfig, job_layout
from ..parallel.layout import Layout
from .machine import GB
from .memory import MemoryPlan, plan_job

# Knobs in the order they are suggested: first those that leave the training as it is.
KNOBS = ("parallel.fsdp", "model.activation_checkpointing", "parallel.ep", "trainer.grad_accum",
         "cluster.num_workers", "trainer.seq_len")  # fmt: skip


def _replace(cfg: JobConfig, section: str, **changes) -> JobConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def _layout(cfg: JobConfig) -> Layout | None:
    """The job's layout, or None where the layout's rules refuse it (divisibility, FSDP with DeepSpeed)."""
    try:
        return job_layout(cfg)
    except ValueError:
        return None


def _candidates(cfg: JobConfig) -> list[tuple[str, JobConfig, Layout]]:
    """One knob changed at a time: (the override, the job with it, that job's layout); a change
    whose layout is invalid is left out."""
    c, t, p, m = cfg.cluster, cfg.trainer, cfg.parallel, cfg.model
    lay = job_layout(cfg)
    out = []
    if not lay.fsdp:
        out.append(("parallel.fsdp=true", _replace(cfg, "parallel", fsdp=True)))
    modes = ("none", "selective", "full")  # keeping less and less
    for mode in modes[modes.index(m.activation_checkpointing) + 1 :]:
        out.append((f"model.activation_checkpointing={mode}", _replace(cfg, "model", activation_checkpointing=mode)))
    for ep in range(p.ep + 1, c.num_workers + 1):
        out.append((f"parallel.ep={ep}", _replace(cfg, "parallel", ep=ep)))
    for factor in (2, 4, 8, 16, 32, 64):
        w = c.num_workers * factor
        more = _replace(cfg, "cluster", num_workers=w)
        if _layout(more) is not None:
            out.append((f"cluster.num_workers={w}", more))
        else:  # the batch does not split over that many: each rank keeps its micro-batch
            gbs = lay.micro_batch * w * t.grad_accum
            out.append((f"cluster.num_workers={w} trainer.global_batch_size={gbs}",
                        _replace(more, "trainer", global_batch_size=gbs)))  # fmt: skip
    for factor in (2**i for i in range(1, lay.micro_batch.bit_length())):
        accum = t.grad_accum * factor
        out.append((f"trainer.grad_accum={accum}", _replace(cfg, "trainer", grad_accum=accum)))
    s = t.seq_len // 2
    while s >= 64:
        out.append((f"trainer.seq_len={s}", _replace(cfg, "trainer", seq_len=s)))
        s //= 2
    return [(override, job, new) for override, job in out if (new := _layout(job)) is not None]


def suggestions(
    cfg: JobConfig, plan: MemoryPlan, cluster_resources: dict | None = None, *, here: bool = False
) -> list[str]:
    """The knobs that would make the job fit, each with the total it would reach (re-planned).

    Per knob: its least change that fits, else its best. When no single knob fits, knobs applied
    together in ``KNOBS`` order, each where it helps, on a last line starting "together:".
    Helping means a smaller share of the budget: more workers on one machine also divide it.
    """
    imbalance = plan.workload.load_imbalance

    def share(p):
        return p.total / p.budget_bytes if p.budget_bytes else p.total

    def line(override, p):
        budget = "" if p.budget_bytes is None else f" of {p.budget_bytes / GB:.1f}"
        return f"{override}: {p.total / GB:.1f}{budget} GB per rank" + (" (fits)" if p.fits else "")

    def best_changes(job, than):
        """knob -> (override, plan, job): its least change that fits, else its best, if it helps."""
        best: dict[str, tuple] = {}
        for override, cand, lay in _candidates(job):
            knob = override.split("=")[0]
            p = plan_job(cand, cluster_resources, here=here, load_imbalance=imbalance, layout=lay)
            have = best.get(knob)
            if share(p) >= share(than) or (have and have[1].fits):
                continue  # no help, or this knob already has a smaller change that fits
            if have is None or p.fits or share(p) < share(have[1]):
                best[knob] = (override, p, cand)
        return best

    single = best_changes(cfg, plan)
    order = sorted(single.values(), key=lambda v: (not v[1].fits, KNOBS.index(v[0].split("=")[0])))
    out = [line(o, p) for o, p, _ in order]
    if single and not any(p.fits for _, p, _ in single.values()):
        chosen, job, p = [], cfg, plan
        for knob in KNOBS:
            change = best_changes(job, p).get(knob)
            if change is not None:
                chosen.append(change[0])
                p, job = change[1], change[2]
                if p.fits:
                    break
        if len(chosen) > 1:
            out.append("together: " + line(" ".join(chosen), p))
    return out
