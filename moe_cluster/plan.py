"""The memory planner: what one rank of a job will hold, in bytes, before anything starts.

``plan_job(cfg)`` counts, per rank, what this repository's code allocates:

- parameters, gradients and optimizer state, exactly, from the parameter shapes as the model
  builds them (dense tensors on every rank, or 1/world with FSDP; expert tensors 1/ep, or
  1/world with FSDP; DeepSpeed ZeRO partitions over each tensor's data-parallel ranks);
- activations: the tensors autograd keeps from the forward for the backward, per micro-batch,
  counted op by op from the model's code (``plan_activations.py``), at their peak;
- transient buffers: the largest buffer that lives beside those (FSDP's gathered blocks,
  autocast's bf16 weight copies, the flat gradient-sync buffer, clipping's fp64 copy).

``total`` is their sum: an upper bound, since the step's buffers and the activations are not
alive at once. Pure arithmetic on the config: no torch.distributed, no Ray. docs/scaling.md says
how it counts and how it was checked against measured bytes.

Legend: W ranks (cluster.num_workers), ep the EP size, E experts, D model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .config import JobConfig
from .model import ModelConfig
from .plan_activations import Precision, activation_bytes

GB = 10**9  # decimal gigabytes, as GPU memory is sold ("80 GB") and as the docs quote plans
LOAD_IMBALANCE = 1.25  # expert rows a rank receives over the mean, allowed for (EP > 1 only)


@dataclass(frozen=True)
class Param:
    """One parameter tensor of the unsharded model."""

    name: str  # as in named_parameters, less the block prefix: "wqkv", "router", "w_up", ...
    unit: str  # its FSDP unit: "root", "block.<i>", or "experts.<i>" (a MoE layer's stacked experts)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def expert(self) -> bool:
        return self.unit.startswith("experts.")


def model_params(m: ModelConfig) -> list[Param]:
    """Every parameter tensor of ``Transformer(m)``, as ``named_parameters`` lists them."""
    D, Hd, x = m.dim, m.dim // m.n_heads, m.moe
    kv = (m.n_kv_heads or m.n_heads) * Hd
    up = 2 if x.activation == "swiglu" else 1  # SwiGLU's [gate | up] projection is twice as wide
    out = [Param("embed", "root", (m.vocab_size, D)), Param("norm", "root", (D,))]
    if not m.tie_embeddings:
        out.append(Param("head", "root", (m.vocab_size, D)))
    for i in range(m.n_layers):
        b = f"block.{i}"
        out += [Param("attn_norm", b, (D,)), Param("wqkv", b, (D + 2 * kv, D)), Param("wo", b, (D, D)),
                Param("ffn_norm", b, (D,))]  # fmt: skip
        if m.is_moe_layer(i):
            out.append(Param("router", b, (x.num_experts, D)))
            if x.shared_experts:
                Hs = x.shared_experts * x.hidden_dim
                out += [Param("shared.up", b, (up * Hs, D)), Param("shared.down", b, (D, Hs))]
            out += [
                Param("w_up", f"experts.{i}", (x.num_experts, D, up * x.hidden_dim)),
                Param("w_down", f"experts.{i}", (x.num_experts, x.hidden_dim, D)),
            ]
        else:
            out += [Param("up", b, (up * m.dense_hidden_dim, D)), Param("down", b, (D, m.dense_hidden_dim))]
    return out


@dataclass(frozen=True)
class Layout:
    """How the job runs, as far as memory goes: derived once from the config."""

    world: int
    ep: int
    fsdp: bool  # parallel.fsdp as it resolves (None: on when world > 1; never with DeepSpeed)
    engine: str
    zero_stage: int | None  # DeepSpeed's zero_optimization.stage, for trainer.engine=deepspeed
    gpu: bool
    micro_batch: int  # sequences per micro-batch on one rank
    seq_len: int
    grad_accum: int
    activation_checkpointing: str
    load_imbalance: float


def layout_of(cfg: JobConfig, load_imbalance: float = LOAD_IMBALANCE) -> Layout:
    c, t = cfg.cluster, cfg.trainer
    fsdp = getattr(cfg.parallel, "fsdp", None)  # parallel.fsdp: None is on for more than one rank
    fsdp = t.engine == "native" and c.num_workers > 1 and (fsdp is None or bool(fsdp))
    stage = None
    if t.engine == "deepspeed":
        stage = int(((cfg.deepspeed or {}).get("zero_optimization") or {}).get("stage", 1))
    return Layout(
        world=c.num_workers, ep=cfg.parallel.ep, fsdp=fsdp, engine=t.engine, zero_stage=stage, gpu=c.use_gpu,
        micro_batch=t.global_batch_size // (c.num_workers * t.grad_accum), seq_len=t.seq_len,
        grad_accum=t.grad_accum, activation_checkpointing=getattr(cfg.model, "activation_checkpointing", "none"),
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
    layout: Layout
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
        group = lay.world // lay.ep  # the expert-data-parallel ranks holding the same slice
        if group == 1:
            return math.prod(shape)  # world == ep: experts stay whole, outside FSDP
        dim = 0 if shape[0] % group == 0 else 1  # whole experts when they divide evenly, else rows
        shape[dim] = _chunk(shape[dim], group)
        return math.prod(shape)
    shape[0] = _chunk(shape[0], lay.world)
    return math.prod(shape)


def _model_state(params: list[Param], lay: Layout) -> tuple[dict, dict, dict, int]:
    """(params, grads, optimizer) breakdowns in bytes, and the largest local tensor's elements."""
    dense = sum(_local(p, lay, False) for p in params if not p.expert)
    expert = sum(_local(p, lay, False) for p in params if p.expert)
    if lay.engine == "deepspeed":
        return (*_zero_state(dense, expert, lay), max(_local(p, lay, False) for p in params))
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
        return f"1/{lay.ep} per EP rank, then sharded over {lay.world // lay.ep} ranks (FSDP)"
    return f"1/{lay.ep} of each layer's experts"


def _zero_state(dense: int, expert: int, lay: Layout) -> tuple[dict, dict, dict]:
    """DeepSpeed ZeRO 1/2 (fp32 model): optimizer state and a fp32 master copy of the parameters
    partitioned over each tensor's data-parallel ranks (dense: the world; experts: the expert-DP
    group); stage 2 partitions the gradients too."""
    part = dense / lay.world + expert / (lay.world // lay.ep)
    pb = {"fp32, whole on every rank (ZeRO below stage 3 does not partition them)": 4 * (dense + expert)}
    ob = {f"AdamW state + fp32 master partition, ZeRO-{lay.zero_stage}": int(12 * part)}
    if lay.zero_stage == 1:
        gb = {"fp32, whole, and the partition's fp32 copy (ZeRO-1)": int(4 * (dense + expert) + 4 * part)}
    else:
        gb = {"fp32 gradient partition (ZeRO-2)": int(4 * part)}
    return pb, gb, ob


# -- transient buffers --------------------------------------------------------------------------


AUTOCAST_COPIES = "autocast's bf16 weight copies, kept for the backward"  # a transient entry of GPU plans


def _transient(cfg: JobConfig, params: list[Param], lay: Layout, largest: int) -> dict[str, int]:
    """The buffers beside the state and activations; the plan counts the largest phase.

    Forward/backward: FSDP's gathered units (or autocast's bf16 weight copies, which the
    backward keeps). After the backward: the flat gradient-sync buffer, and clipping's fp64 copy
    of one gradient (``.double().pow(2)``: 16 bytes an element; AdamW's per-tensor temporaries
    are half that).
    """
    compute = 2 if lay.gpu else 4  # bytes per element of bf16 (GPU) or fp32 (CPU) compute
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
    elif lay.gpu:
        # Autocast casts each weight to bf16 once per forward and the matmuls save the copies.
        # The router runs in fp32 (autocast off); the head casts the embedding when they are tied.
        skip = ("embed", "head", "router")
        matmul = sum(_local(p, lay, False) for p in params if p.name not in skip and not p.name.endswith("norm"))
        head = cfg.model.vocab_size * cfg.model.dim
        out[AUTOCAST_COPIES] = 2 * (matmul + head)
    if lay.engine == "deepspeed":
        zero = (cfg.deepspeed or {}).get("zero_optimization") or {}
        bucket = min(int(zero.get("reduce_bucket_size", 500_000_000)), sum(_local(p, lay, False) for p in params))
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


def memory_budget(cfg: JobConfig, cluster_resources: dict | None, here: bool) -> tuple[int | None, str]:
    """(bytes one rank may use, where that figure comes from).

    GPU workers: ``cluster.gpu_memory_gb``. CPU workers: ``cluster.memory_gb_per_worker``, else
    the node's memory over the workers placed on it: from ``cluster_resources`` (Ray's
    ``memory`` + ``object_store_memory``, the RAM it manages, over the nodes, nodes taken as
    alike), else, for a job that runs on this machine (``here``: the embedded local Ray), this
    machine's memory over ``cluster.num_workers``; otherwise unknown.
    """
    c = cfg.cluster
    if c.use_gpu:
        return int(c.gpu_memory_gb * GB), f"cluster.gpu_memory_gb={c.gpu_memory_gb:g}"
    if c.memory_gb_per_worker is not None:
        return int(c.memory_gb_per_worker * GB), f"cluster.memory_gb_per_worker={c.memory_gb_per_worker:g}"
    if cluster_resources is not None and cluster_resources.get("memory"):
        nodes = max(1, sum(1 for k in cluster_resources if k.startswith("node:") and k != "node:__internal_head__"))
        node_bytes = (cluster_resources["memory"] + cluster_resources.get("object_store_memory", 0)) / nodes
        per_node_cpu = cluster_resources.get("CPU", 0) / nodes
        if c.placement_strategy == "SPREAD":
            workers = math.ceil(c.num_workers / nodes)
        else:  # PACK fills a node's CPUs first
            workers = min(c.num_workers, max(math.ceil(c.num_workers / nodes), int(per_node_cpu // c.cpus_per_worker)))
        return int(node_bytes / workers), f"{node_bytes / GB:.1f} GB a node (Ray) over {workers} worker(s) on it"
    if here:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total / c.num_workers), f"this machine's {total / GB:.1f} GB over {c.num_workers} worker(s)"
    return None, "unknown (CPU workers on a cluster not reached yet; set cluster.memory_gb_per_worker to check)"


def plan_job(
    cfg: JobConfig, cluster_resources: dict | None = None, *, here: bool = False, load_imbalance: float = LOAD_IMBALANCE
) -> MemoryPlan:
    """The memory plan of an assembled, validated job (see ``memory_budget`` for ``here``)."""
    m = cfg.model
    if m.vocab_size is None:
        raise ValueError("model.vocab_size is null: the plan needs the vocabulary; set model.vocab_size (see meta.json)")
    lay = layout_of(cfg, load_imbalance)
    params = model_params(m)
    pb, gb, ob, largest = _model_state(params, lay)
    prec = Precision.of(lay.gpu, lay.fsdp)
    ab = activation_bytes(m, lay.micro_batch * lay.seq_len, lay.ep, lay.activation_checkpointing, prec,
                          load_imbalance=load_imbalance, eager=not lay.gpu or m.moe.backend == "torch")  # fmt: skip
    tb = _transient(cfg, params, lay, largest)
    phase = max(tb.values())
    budget, source = memory_budget(cfg, cluster_resources, here)
    total, expert = sum(p.numel for p in params), sum(p.numel for p in params if p.expert)
    unused = expert * (m.moe.num_experts - m.moe.top_k) // m.moe.num_experts  # experts a token does not visit
    counts = {"total": total, "expert": expert, "active": total - unused}
    return MemoryPlan(
        params=sum(pb.values()), grads=sum(gb.values()), optimizer=sum(ob.values()),
        activations=ab.pop("peak"), transient=phase, budget_bytes=budget, budget_source=source, layout=lay,
        model=counts, breakdown={"params": pb, "grads": gb, "optimizer": ob, "activations": ab, "transient": tb},
    )  # fmt: skip


def to_json(plan: MemoryPlan) -> dict:
    """The plan as one JSON-able object (``moe-cluster plan --json``)."""
    per_rank = {k: getattr(plan, k) for k in ("params", "grads", "optimizer", "activations", "transient", "total")}
    gpu = plan.layout.gpu
    return {
        "per_rank_bytes": per_rank,
        "gpu_memory_bytes": plan.budget_bytes if gpu else None,
        "host_memory_bytes": None if gpu else plan.budget_bytes,
        "budget": plan.budget_source,
        "fits": plan.fits,
        "layout": dataclasses.asdict(plan.layout),
        "parameters": plan.model,
        "breakdown": plan.breakdown,
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: MemoryPlan) -> str:
    """A table of the per-rank figures, what each is made of, and the verdict."""
    lay, mc = plan.layout, plan.model
    unit, scale = ("GB", GB) if plan.total >= GB else ("MB", 10**6)

    def size(n: float) -> str:
        return f"{n / scale:9.2f}"

    where = "GPU (bf16 compute, fp32 master weights)" if lay.gpu else "CPU (fp32)"
    engine = "native, fsdp " + ("on" if lay.fsdp else "off")
    if lay.engine == "deepspeed":
        engine = f"deepspeed ZeRO-{lay.zero_stage}"
    lines = [
        f"memory plan: {_count(mc['total'])} parameters ({_count(mc['expert'])} in experts), {lay.world} rank(s), "
        f"ep={lay.ep}, {engine}, {where}",
        f"micro-batch {lay.micro_batch} x {lay.seq_len} tokens (grad_accum {lay.grad_accum}), activation "
        f"checkpointing {lay.activation_checkpointing}, expert load allowance {lay.load_imbalance:g}",
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


# -- what would make it fit -------------------------------------------------------------------


def _replace(cfg: JobConfig, section: str, **changes) -> JobConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def _candidates(cfg: JobConfig) -> list[tuple[str, JobConfig]]:
    """One knob changed at a time: (the override, the job with it)."""
    c, t, p, m = cfg.cluster, cfg.trainer, cfg.parallel, cfg.model
    out = []
    lay = layout_of(cfg)
    if t.engine == "native" and not lay.fsdp and c.num_workers > 1 and hasattr(p, "fsdp"):
        out.append(("parallel.fsdp=true", _replace(cfg, "parallel", fsdp=True)))
    modes = ("none", "selective", "full")  # keeping less and less
    if hasattr(m, "activation_checkpointing"):
        for mode in modes[modes.index(lay.activation_checkpointing) + 1 :]:
            out.append((f"model.activation_checkpointing={mode}", _replace(cfg, "model", activation_checkpointing=mode)))
    for ep in range(p.ep + 1, c.num_workers + 1):
        if c.num_workers % ep == 0 and m.moe.num_experts % ep == 0:
            out.append((f"parallel.ep={ep}", _replace(cfg, "parallel", ep=ep)))
    micro = t.global_batch_size // (c.num_workers * t.grad_accum)
    for factor in (2, 4, 8, 16, 32, 64):
        w = c.num_workers * factor
        if t.global_batch_size % (w * t.grad_accum) == 0:
            out.append((f"cluster.num_workers={w}", _replace(cfg, "cluster", num_workers=w)))
        else:  # the batch does not split over that many: each rank keeps its micro-batch
            gbs = micro * w * t.grad_accum
            more = _replace(_replace(cfg, "cluster", num_workers=w), "trainer", global_batch_size=gbs)
            out.append((f"cluster.num_workers={w} trainer.global_batch_size={gbs}", more))
    for factor in (2**i for i in range(1, micro.bit_length())):
        if micro % factor == 0:
            accum = t.grad_accum * factor
            out.append((f"trainer.grad_accum={accum}", _replace(cfg, "trainer", grad_accum=accum)))
    s = t.seq_len // 2
    while s >= 64:
        out.append((f"trainer.seq_len={s}", _replace(cfg, "trainer", seq_len=s)))
        s //= 2
    return out


# Knobs in the order they are suggested: first those that leave the training as it is.
KNOBS = ("parallel.fsdp", "model.activation_checkpointing", "parallel.ep", "trainer.grad_accum",
         "cluster.num_workers", "trainer.seq_len")  # fmt: skip


def suggestions(
    cfg: JobConfig, plan: MemoryPlan, cluster_resources: dict | None = None, *, here: bool = False
) -> list[str]:
    """The knobs that would make the job fit, each with the total it would reach (re-planned).

    Per knob: its least change that fits, else its best. When no single knob fits, knobs applied
    together in ``KNOBS`` order, each where it helps, on a last line starting "together:".
    Helping means a smaller share of the budget: more workers on one machine also divide it.
    """
    imbalance = plan.layout.load_imbalance

    def share(p):
        return p.total / p.budget_bytes if p.budget_bytes else p.total

    def line(override, p):
        budget = "" if p.budget_bytes is None else f" of {p.budget_bytes / GB:.1f}"
        return f"{override}: {p.total / GB:.1f}{budget} GB per rank" + (" (fits)" if p.fits else "")

    def best_changes(job, than):
        """knob -> (override, plan, job): its least change that fits, else its best, if it helps."""
        best: dict[str, tuple] = {}
        for override, cand in _candidates(job):
            knob, p = override.split("=")[0], plan_job(cand, cluster_resources, here=here, load_imbalance=imbalance)
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


def runs_here(cfg: JobConfig) -> bool:
    """Whether the job's workers run on this machine: the embedded local Ray (no cluster.address,
    no RAY_ADDRESS to join)."""
    return cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS")


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
