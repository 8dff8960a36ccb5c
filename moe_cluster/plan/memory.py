"""The planner's arithmetic: what one rank of a job will hold, in bytes, before anything starts.

``plan_job(cfg)`` counts, per rank, what this repository's code allocates:

- parameters, gradients and optimizer state, exactly, from the parameter tensors the model
  builds (``params.py``): dense tensors on every rank, or 1/world with FSDP; expert tensors
  1/ep, or 1/world with FSDP; DeepSpeed ZeRO partitions over each tensor's data-parallel ranks;
- activations: the tensors autograd keeps from the forward for the backward, per micro-batch,
  counted op by op from the model's code (``activations.py``), at their peak;
- transient buffers: the largest buffer that lives beside those (FSDP's gathered blocks,
  autocast's bf16 weight copies, the flat gradient-sync buffer, clipping's fp64 copy).

``total`` is their sum: an upper bound, since the step's buffers and the activations are not
alive at once. The arithmetic reads the job's ``Layout`` (moe_cluster/parallel/layout.py: ranks,
EP, FSDP as resolved there, micro-batch) and its ``Workload`` (how each rank computes); the
budget it is held against comes from ``machine.py``. No torch.distributed, no Ray.
docs/scaling.md says how it counts and how it was checked against measured bytes.

Legend: W ranks (cluster.num_workers), ep the EP size, E experts, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import JobConfig, job_layout
from ..model import ModelConfig
from ..parallel.layout import Layout
from .activations import Precision, activation_bytes
from .machine import memory_budget
from .params import Param, model_params

LOAD_IMBALANCE = 1.25  # expert rows a rank receives over the mean, allowed for (EP > 1 only)


@dataclass(frozen=True)
class Workload:
    """What the plan needs beyond the job's ``Layout``: how each rank computes."""

    engine: str  # trainer.engine
    zero_stage: int | None  # DeepSpeed's zero_optimization.stage, for trainer.engine=deepspeed
    reduce_bucket: int | None  # DeepSpeed's zero_optimization.reduce_bucket_size (elements), likewise
    gpu: bool  # cluster.use_gpu: bf16 compute under autocast; fp32 on CPU
    seq_len: int  # trainer.seq_len
    activation_checkpointing: str  # model.activation_checkpointing
    load_imbalance: float  # expert rows a rank receives over the mean, allowed for (EP > 1 only)

    @classmethod
    def of(cls, cfg: JobConfig, load_imbalance: float = LOAD_IMBALANCE) -> Workload:
        t = cfg.trainer
        zero = ((cfg.deepspeed or {}).get("zero_optimization") or {}) if t.engine == "deepspeed" else None
        return cls(
            engine=t.engine, zero_stage=None if zero is None else int(zero.get("stage", 1)),
            reduce_bucket=None if zero is None else int(zero.get("reduce_bucket_size", 500_000_000)),
            gpu=cfg.cluster.use_gpu, seq_len=t.seq_len, activation_checkpointing=cfg.model.activation_checkpointing,
            load_imbalance=load_imbalance,
        )  # fmt: skip


@dataclass
class MemoryPlan:
    """Bytes per rank, the memory one rank may use, and where each figure comes from."""

    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    budget_bytes: int | None  # what one rank may use; None: unknown here (no refusal)
    budget_source: str  # e.g. "cluster.gpu_memory_gb=80"
    layout: Layout  # the job's, as job_layout built it
    workload: Workload
    model: dict[str, int]  # parameter counts: total, expert, active (per token)
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)  # figure -> {what: bytes}

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient

    @property
    def model_state(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.total <= self.budget_bytes


# -- model state ------------------------------------------------------------------------------


def _chunk(n: int, parts: int) -> int:
    """The largest piece of ``n`` split in ``parts`` (torch.chunk's, as FSDP shards)."""
    return -(-n // parts)


def _local(p: Param, lay: Layout, sharded: bool) -> int:
    """Elements of ``p`` on the fullest rank: experts split over ep, then FSDP's shard of that."""
    shape = list(p.shape)
    if p.expert:
        shape[0] //= lay.ep
    if not sharded:
        return math.prod(shape)
    if p.expert:
        group = lay.expert_dp  # the expert-data-parallel ranks holding the same slice
        if group == 1:
            return math.prod(shape)  # world == ep: experts stay whole, outside FSDP
        dim = 0 if shape[0] % group == 0 else 1  # whole experts when they divide evenly, else rows
        shape[dim] = _chunk(shape[dim], group)
        return math.prod(shape)
    shape[0] = _chunk(shape[0], lay.world)
    return math.prod(shape)


def _model_state(params: list[Param], lay: Layout, work: Workload) -> tuple[dict, dict, dict, int]:
    """(params, grads, optimizer) breakdowns in bytes, and the largest local tensor's elements."""
    dense = sum(_local(p, lay, False) for p in params if not p.expert)
    expert = sum(_local(p, lay, False) for p in params if p.expert)
    if work.engine == "deepspeed":
        return (*_zero_state(dense, expert, lay, work.zero_stage), max(_local(p, lay, False) for p in params))
    s_dense = sum(_local(p, lay, lay.fsdp) for p in params if not p.expert)
    s_expert = sum(_local(p, lay, lay.fsdp) for p in params if p.expert)
    how = f"sharded over {lay.world} ranks (FSDP)" if lay.fsdp else "every rank"
    pb = {f"dense, fp32, {how}": 4 * s_dense, f"experts ({_experts_note(lay)}), fp32": 4 * s_expert}
    if lay.fsdp and lay.grad_accum > 1:
        # Gradient sync is off for all but the last micro-batch: FSDP accumulates unsharded
        # gradients (fp32) and reduce-scatters once (train/step.py).
        gb = {"fp32, unsharded: accumulated over micro-batches (FSDP, grad_accum > 1)": 4 * (dense + expert)}
    else:
        gb = {"fp32, as the parameters": 4 * (s_dense + s_expert)}
    ob = {"AdamW exp_avg + exp_avg_sq, fp32, as the parameters": 8 * (s_dense + s_expert)}
    largest = max(_local(p, lay, lay.fsdp) for p in params)
    return pb, gb, ob, largest


def _experts_note(lay: Layout) -> str:
    if lay.fsdp and lay.world > lay.ep:
        return f"1/{lay.ep} per EP rank, then sharded over {lay.expert_dp} ranks (FSDP)"
    return f"1/{lay.ep} of each layer's experts"


def _zero_state(dense: int, expert: int, lay: Layout, stage: int) -> tuple[dict, dict, dict]:
    """DeepSpeed ZeRO 1/2 (fp32 model): optimizer state and a fp32 master copy of the parameters
    partitioned over each tensor's data-parallel ranks (dense: the world; experts: the expert-DP
    group); stage 2 partitions the gradients too."""
    part = dense / lay.world + expert / lay.expert_dp
    pb = {"fp32, whole on every rank (ZeRO below stage 3 does not partition them)": 4 * (dense + expert)}
    ob = {f"AdamW state + fp32 master partition, ZeRO-{stage}": int(12 * part)}
    if stage == 1:
        gb = {"fp32, whole, and the partition's fp32 copy (ZeRO-1)": int(4 * (dense + expert) + 4 * part)}
    else:
        gb = {"fp32 gradient partition (ZeRO-2)": int(4 * part)}
    return pb, gb, ob


# -- transient buffers --------------------------------------------------------------------------


AUTOCAST_COPIES = "autocast's bf16 weight copies, kept for the backward"  # a transient entry of GPU plans


def _transient(m: ModelConfig, params: list[Param], lay: Layout, work: Workload, largest: int) -> dict[str, int]:
    """The buffers beside the state and activations; the plan counts the largest phase.

    Forward/backward: FSDP's gathered units (or autocast's bf16 weight copies, which the
    backward keeps). After the backward: the flat gradient-sync buffer, and clipping's fp64 copy
    of one gradient (``.double().pow(2)``: 16 bytes an element; AdamW's per-tensor temporaries
    are half that).
    """
    compute = 2 if work.gpu else 4  # bytes per element of bf16 (GPU) or fp32 (CPU) compute
    out: dict[str, int] = {}
    if lay.fsdp:
        gathered: dict[str, int] = {}  # elements each FSDP unit gathers; an MoE block's with its experts
        for p in params:
            if p.expert and lay.world == lay.ep:
                continue  # one rank per expert-DP group: experts stay whole, outside FSDP
            key = "root" if p.unit == "root" else "block." + p.unit.split(".")[1]
            gathered[key] = gathered.get(key, 0) + _local(p, lay, False)
        block = max(v for k, v in gathered.items() if k != "root")
        what = ("FSDP: embedding/head gathered, 2 blocks gathered (one computing, one prefetched), one "
                "block's unsharded fp32 gradients in the reduce-scatter")  # fmt: skip
        out[what] = compute * (gathered["root"] + 2 * block) + 4 * block
    elif work.gpu:
        # Autocast casts each weight to bf16 once per forward and the matmuls save the copies.
        # The router runs in fp32 (autocast off); the head casts the embedding when they are tied.
        skip = ("embed", "head", "router")
        matmul = sum(_local(p, lay, False) for p in params if p.name not in skip and not p.name.endswith("norm"))
        out[AUTOCAST_COPIES] = 2 * (matmul + m.vocab_size * m.dim)
    if work.engine == "deepspeed":
        bucket = min(work.reduce_bucket, sum(_local(p, lay, False) for p in params))
        out["DeepSpeed's gradient reduce bucket (zero_optimization.reduce_bucket_size), fp32"] = 4 * bucket
    else:
        # Plain (unsharded) gradients are concatenated for their all-reduce where a group holds
        # copies of them: dense ones over the world, experts over their expert-data-parallel group
        # (none when world == ep: they are scaled in place). FSDP's shards are reduce-scattered.
        dense, experts = (sum(_local(p, lay, False) for p in params if p.expert == e) for e in (False, True))
        flat = [0 if lay.fsdp or lay.world == 1 else dense, 0 if lay.fsdp or lay.world == lay.ep else experts]
        sync = 4 * max(flat)
        if sync:
            out["gradient sync: the dense, then the expert gradients concatenated, fp32"] = sync
    out["gradient clipping's fp64 square of the largest gradient"] = 16 * largest
    return out


# -- the plan -------------------------------------------------------------------------------------


def plan_job(
    cfg: JobConfig, cluster_resources: dict | None = None, *, here: bool = False,
    load_imbalance: float = LOAD_IMBALANCE, layout: Layout | None = None,
) -> MemoryPlan:  # fmt: skip
    """The memory plan of an assembled, validated job (see ``memory_budget`` for ``here``).

    ``layout``: the job's, where the caller has built it already (``job_layout(cfg)``)."""
    m = cfg.model
    if m.vocab_size is None:
        raise ValueError("model.vocab_size is null: the plan needs the vocabulary; set model.vocab_size (see meta.json)")
    lay = job_layout(cfg) if layout is None else layout
    work = Workload.of(cfg, load_imbalance)
    params = model_params(m)
    pb, gb, ob, largest = _model_state(params, lay, work)
    prec = Precision.of(work.gpu, lay.fsdp)
    ab = activation_bytes(m, lay.micro_batch * work.seq_len, lay.ep, work.activation_checkpointing, prec,
                          load_imbalance=load_imbalance, eager=not work.gpu or m.moe.backend == "torch")  # fmt: skip
    tb = _transient(m, params, lay, work, largest)
    budget, source = memory_budget(cfg, cluster_resources, here)
    total, expert = sum(p.numel for p in params), sum(p.numel for p in params if p.expert)
    unused = expert * (m.moe.num_experts - m.moe.top_k) // m.moe.num_experts  # experts a token does not visit
    counts = {"total": total, "expert": expert, "active": total - unused}
    return MemoryPlan(
        params=sum(pb.values()), grads=sum(gb.values()), optimizer=sum(ob.values()),
        activations=ab.pop("peak"), transient=max(tb.values()), budget_bytes=budget, budget_source=source,
        layout=lay, workload=work, model=counts,
        breakdown={"params": pb, "grads": gb, "optimizer": ob, "activations": ab, "transient": tb},
    )  # fmt: skip
