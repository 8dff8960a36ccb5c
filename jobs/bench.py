"""MoE layer benchmark: forward+backward tokens/s of MoELayer against its baselines.

    python jobs/bench.py                      # CPU, fp32, E=16 and E=64 (what `make bench` runs)
    python jobs/bench.py --device cuda --dtype bf16

Implementations, timed interleaved in one process (each repetition runs every one once, in a
rotating order, so machine noise hits them alike), on fresh random tokens each repetition (so
the routing changes as it does from step to step); medians reported, and ratios as medians of
per-repetition ratios:

- moe:       moe_cluster.MoELayer (backend auto: Triton on CUDA, the eager fast path on CPU,
             whose large fp32 GEMMs go through oneDNN where torch has it: kernels/cpu_gemm.py)
- moe-blas:  (CPU) the same layer with ``torch.backends.mkldnn`` disabled: its GEMMs take torch.mm
- dense:     the dense-equivalent, one dense GELU MLP on T*K rows (nn.Linear): the same matmul
             FLOPs with none of the routing
- dense-onednn: (CPU) the same dense MLP with its GEMMs through oneDNN, like the layer's: the
             roofline for this work when the layer uses oneDNN
- loop:      a per-expert Python loop (mask, gather, expert MLP, index_add), the usual first version
- deepspeed: deepspeed.moe.layer.MoE with capacity_factor 1.25 (its default top-2 gating)

The router's own cost counts against moe, loop and deepspeed; the dense-equivalent has none.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from moe_cluster import MoELayer
from moe_cluster.moe import Router
from moe_kernels import cpu_gemm

IMPLS = ("moe", "moe-blas", "dense", "dense-onednn", "loop", "deepspeed")
CPU_ONLY = ("moe-blas", "dense-onednn")


class DenseEquivalent(nn.Module):
    """One GELU MLP applied to T*K rows: the FLOPs of the experts, without routing."""

    def __init__(self, dim: int, hidden: int, top_k: int):
        super().__init__()
        self.rows_per_token = top_k  # it is fed T*K rows directly: no copy is timed
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_RD):
        return self.down(F.gelu(self.up(x_RD)))


class DenseEquivalentOneDNN(DenseEquivalent):
    """The dense-equivalent with its six GEMMs through ``moe_kernels.cpu_gemm`` (oneDNN on CPU)."""

    def forward(self, x_RD):
        return cpu_gemm.linear(F.gelu(cpu_gemm.linear(x_RD, self.up.weight)), self.down.weight)


class BlasGemms(nn.Module):
    """Runs a module, forward and backward, with its GEMMs on torch.mm (``time_step`` enters ``context``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

    @staticmethod
    def context():
        return cpu_gemm.blas()


class PerExpertLoop(nn.Module):
    """The straightforward MoE: for each expert, pick its tokens, run its MLP, add back."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.router = Router(dim, num_experts, top_k)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
            for _ in range(num_experts)
        )

    def forward(self, x_TD):
        routing = self.router(x_TD)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(routing.expert_TK == e, as_tuple=True)
            if token.numel():
                out = expert(x_TD[token]) * routing.weight_TK[token, slot, None].to(x_TD.dtype)
                y_TD = y_TD.index_add(0, token, out)
        return y_TD


class DeepSpeedMoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
        self.moe = MoE(dim, expert, num_experts=num_experts, ep_size=1, k=top_k, capacity_factor=1.25)

    def forward(self, x_TD):
        return self.moe(x_TD)[0]


def _init_single_process_group() -> None:
    """DeepSpeed's MoE layer needs torch.distributed even on one process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)


def build(name: str, args, num_experts: int) -> nn.Module:
    D, H, K = args.dim, args.hidden, args.top_k
    if name == "moe":
        return MoELayer(D, H, num_experts, K, activation="gelu", aux_loss_coef=0.0)
    if name == "moe-blas":
        return BlasGemms(MoELayer(D, H, num_experts, K, activation="gelu", aux_loss_coef=0.0))
    if name == "dense":
        return DenseEquivalent(D, H, K)
    if name == "dense-onednn":
        return DenseEquivalentOneDNN(D, H, K)
    if name == "loop":
        return PerExpertLoop(D, H, num_experts, K)
    if name == "deepspeed":
        _init_single_process_group()
        return DeepSpeedMoE(D, H, num_experts, K)
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(module: nn.Module, x_TD: torch.Tensor, grad_TD: torch.Tensor) -> float:
    """Seconds for one forward+backward, grads reset to None first as optimizers do."""
    module.zero_grad(set_to_none=True)
    x_TD.grad = None
    _sync(x_TD.device)
    with getattr(module, "context", contextlib.nullcontext)():
        start = time.perf_counter()
        module(x_TD).backward(grad_TD)
        _sync(x_TD.device)
        return time.perf_counter() - start


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for E in args.experts:
        torch.manual_seed(0)
        modules = {name: build(name, args, E).to(device=device, dtype=dtype) for name in args.impls}
        inputs = {}
        for name, module in modules.items():
            num_rows = args.tokens * getattr(module, "rows_per_token", 1)
            x = torch.empty(num_rows, args.dim, device=device, dtype=dtype, requires_grad=True)
            inputs[name] = (x, torch.empty_like(x))
        times = {name: [] for name in modules}
        names = list(modules)
        for rep in range(args.warmup + args.reps):
            # Fresh tokens every repetition, as in training: the routing, and so every expert's
            # row count, changes from step to step (a GEMM library that specialises code per
            # shape pays for that here, as it would in a real run). Refilled in place: the
            # same memory every time, so no implementation is charged for fresh pages of input.
            with torch.no_grad():
                for x, grad in inputs.values():
                    x.normal_()
                    grad.normal_()
            # Rotate the order each repetition, so that no implementation always runs right after
            # the same neighbour (whose allocations and cache state it would inherit).
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                t = time_step(modules[name], *inputs[name])
                if rep >= args.warmup:
                    times[name].append(t)
        med = {name: statistics.median(ts) for name, ts in times.items()}

        def ratio(num: str, den: str) -> float:
            # Median of the per-repetition ratios: both times come from the same repetition, so
            # the machine's slow drifts cancel out.
            return statistics.median(a / b for a, b in zip(times[num], times[den]))

        for name in modules:
            row = {"experts": E, "impl": name, "median_s": med[name], "tokens_per_s": args.tokens / med[name]}
            if "dense" in med:
                row["vs_dense"] = ratio("dense", name)
            if "dense-onednn" in med:
                row["vs_dense_onednn"] = ratio("dense-onednn", name)
            if "moe" in med:
                row["moe_speedup"] = ratio(name, "moe")
            rows.append(row)
        del modules, inputs
    return rows


def markdown(rows: list[dict], args) -> str:
    head = (
        f"D={args.dim}, H={args.hidden}, K={args.top_k}, T={args.tokens}, gelu, {args.dtype}, {args.device}; "
        f"forward+backward, median of {args.reps} interleaved repetitions after {args.warmup} warm-up; "
        "ratios are medians of per-repetition ratios\n\n"
        "| E | implementation | median ms | tokens/s | vs dense | vs dense-onednn | MoELayer speedup over it |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        vs = f"{r['vs_dense']:.3f}" if "vs_dense" in r else "-"
        vs1 = f"{r['vs_dense_onednn']:.3f}" if "vs_dense_onednn" in r else "-"
        sp = f"{r['moe_speedup']:.2f}x" if "moe_speedup" in r and r["impl"] != "moe" else "-"
        ms, tps = 1e3 * r["median_s"], r["tokens_per_s"]
        body += f"| {r['experts']} | {r['impl']} | {ms:.1f} | {tps:,.0f} | {vs} | {vs1} | {sp} |\n"
    return head + body


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impls", nargs="+", choices=IMPLS, help="default: all (on CUDA: all but the CPU-only ones)")
    args = p.parse_args(argv)
    if args.impls is None:
        args.impls = [name for name in IMPLS if args.device == "cpu" or name not in CPU_ONLY]
    elif args.device != "cpu" and set(args.impls) & set(CPU_ONLY):
        p.error(f"{', '.join(CPU_ONLY)} compare CPU GEMM libraries; leave them out with --device {args.device}")
    print(f"machine: {machine()}", flush=True)
    print(markdown(run(args), args))


if __name__ == "__main__":
    main()
