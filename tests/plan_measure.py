"""Measured memory of one rank, to check the planner (moe_cluster/plan/) against.

Model state: the bytes of this rank's parameter shards, their gradients and the optimizer's
state tensors (``to_local()`` for FSDP's DTensors), after one optimizer step.

Activations: the bytes of every storage allocated during one micro-batch's forward and loss that
is still alive when it returns, i.e. what the graph keeps for the backward, each storage once,
plus the logits. Counted by liveness (a TorchDispatchMode records every storage an op makes; at
the end those with an owner besides the recorder are kept) rather than with
``torch.autograd.graph.saved_tensors_hooks``: activation checkpointing installs its own hooks,
which hide the tensors saved inside a block from an outer one, and what it keeps instead (block
inputs, selective checkpointing's cache) is held outside any hook. Without checkpointing the two
ways agree (``saved_tensor_bytes`` is the hook-based one, for that comparison).

Functions here run on every rank of ``moe_cluster.train.launch.launch`` (spawned processes import
them), or in-process for one rank.
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from moe_cluster.model import preset
from moe_cluster.plan import AUTOCAST_COPIES
from moe_cluster.parallel.checkpointing import kept_activation_bytes
from moe_cluster.train import DataConfig, OptimConfig, TrainConfig, Trainer
from moe_cluster.train.trainer import local_layout
from moe_cluster.train.step import loss_fn

DATA = DataConfig(max_bytes=300_000)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def saved_tensor_bytes(model, inputs, targets) -> int:
    """The brief's other way, valid without checkpointing: distinct storages autograd saved, less
    parameters and buffers, plus the logits."""
    saved, logits = [], []
    hook = model.register_forward_hook(lambda _m, _i, out: logits.append(out))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        loss_fn(model, inputs, targets)
    hook.remove()
    state = {_local(t).untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved + logits}
    return sum(n for ptr, n in storages.items() if ptr not in state)


def model_config(name: str, checkpointing: str, n_layers: int | None = None):
    """The preset ``name``, with its first ``n_layers`` layers only when given (two layers of
    ``mixtral`` fit one GPU with their optimizer state)."""
    model = dataclasses.replace(preset(name), activation_checkpointing=checkpointing)
    return dataclasses.replace(model, n_layers=n_layers) if n_layers else model


def build(
    name: str, seq_len: int, micro_batch: int, ep: int, fsdp: bool, checkpointing: str,
    n_layers: int | None = None, device: str = "cpu",
) -> Trainer:  # fmt: skip
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    train = TrainConfig(
        global_batch_size=world * micro_batch, seq_len=seq_len, eval_every=0, checkpoint_every=0,
        optim=OptimConfig(warmup_steps=1, decay_steps=10),
    )  # fmt: skip
    model = model_config(name, checkpointing, n_layers)
    return Trainer(model, train, DATA, local_layout(model, train, ep=ep, fsdp=fsdp), device=device)


def measure(
    name: str, seq_len: int, micro_batch: int, ep: int, variants: list[tuple[bool, str]], timed_steps: int = 0,
    n_layers: int | None = None, device: str = "cpu",
) -> list[dict]:  # fmt: skip
    """This rank's measured bytes for each ``(fsdp, activation_checkpointing)`` variant: params,
    grads, optimizer, activations, and ``rows``: the rows its experts computed, per MoE layer;
    with ``timed_steps``, ``step_s``: the median seconds of that many steps after the first."""
    out = []
    for fsdp, ac in variants:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out.append(_measure(build(name, seq_len, micro_batch, ep, fsdp, ac, n_layers, device), ac, timed_steps))
        gc.collect()  # FSDP's modules hold reference cycles: free one variant's trainer before the next
        if device == "cuda":
            out[-1]["peak_allocated"] = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()
    return out


def _measure(trainer: Trainer, checkpointing: str, timed_steps: int = 0) -> dict:
    trainer.train_step()  # gradients and AdamW state exist from here
    seconds = sorted(trainer.train_step()["seconds"] for _ in range(timed_steps))
    model = trainer.model
    params = list(model.parameters())
    out = {
        "params": sum(_local(p).nbytes for p in params),
        "grads": sum(_local(p.grad).nbytes for p in params if p.grad is not None),
        "optimizer": sum(
            _local(v).nbytes for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
    (inputs, targets), *_ = trainer._micro_batches()
    # With EP the experts' forward gets the rows this rank computes (the fused path at EP=1,
    # which does not call it, computes every (token, slot): T*K rows).
    rows = []
    hooks = [layer.experts.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
             for layer in model.moe_layers()]  # fmt: skip
    # The logits die when loss_fn returns (the cross-entropy keeps its log-softmax); they are
    # alive at the forward's end, and the plan counts them, so the hook keeps them alive here.
    logits = []
    hooks.append(model.register_forward_hook(lambda _m, _i, o: logits.append(o)))
    (loss, _), out["activations"] = kept_activation_bytes(lambda: loss_fn(model, inputs, targets))
    for hook in hooks:
        hook.remove()
    K = trainer.model_cfg.moe.top_k
    out["rows"] = rows[: len(model.moe_layers())] or [inputs.numel() * K] * len(model.moe_layers())
    if checkpointing == "none":
        out["saved_tensors"] = saved_tensor_bytes(model, inputs, targets)
    loss.backward()  # frees the graph as a step would (and checks that it was whole)
    if seconds:
        out["step_s"] = seconds[len(seconds) // 2]
    return out


# -- measured against planned -----------------------------------------------------------------


def planned(
    name: str, world: int, ep: int, fsdp: bool, checkpointing: str, seq_len: int, micro_batch: int,
    load_imbalance: float, n_layers: int | None = None, gpu: bool = False,
):  # fmt: skip
    """The plan of the job ``measure`` runs (CPU workers, or GPU ones)."""
    from moe_cluster.config import ClusterConfig, JobConfig, ParallelConfig, TrainerConfig
    from moe_cluster.plan import plan_job

    cfg = JobConfig(
        model=model_config(name, checkpointing, n_layers), parallel=ParallelConfig(ep=ep),
        cluster=ClusterConfig(num_workers=world, use_gpu=gpu),
        trainer=TrainerConfig(seq_len=seq_len, global_batch_size=world * micro_batch),
    )  # fmt: skip
    cfg.parallel.fsdp = fsdp
    return plan_job(cfg, load_imbalance=load_imbalance)


def compare(
    name: str, world: int, ep: int, variants: list[tuple[bool, str]], seq_len: int = 64, micro_batch: int = 2,
    timed_steps: int = 0, n_layers: int | None = None, device: str = "cpu",
) -> list[dict]:
    """Measured and planned bytes of every rank and variant (``measure`` on ``world`` gloo ranks).

    Each rank's plan is made at the routing it really got: the rows its experts computed over
    T*K, as the load allowance (the default, 1.25, is headroom over the mean; at initialisation
    the busiest EP rank gets about 1.5).
    """
    from moe_cluster.train.launch import launch

    args = (name, seq_len, micro_batch, ep, variants, timed_steps, n_layers, device)
    results = [measure(*args)] if world == 1 else launch(world, measure, *args)
    slots = micro_batch * seq_len * preset(name).moe.top_k
    out = []
    for i, (fsdp, checkpointing) in enumerate(variants):
        for rank, got in enumerate(r[i] for r in results):
            share = sum(got["rows"]) / len(got["rows"]) / slots
            plan = planned(name, world, ep, fsdp, checkpointing, seq_len, micro_batch, share, n_layers, device == "cuda")
            # Measured at the forward's end: the plan's peak less the block a checkpointed backward recomputes.
            kept = plan.activations - plan.breakdown["activations"].get("one block recomputed in the backward", 0)
            want = {"params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer, "activations": kept,
                    "transient": plan.transient, "total": plan.total,
                    "autocast_copies": plan.breakdown["transient"].get(AUTOCAST_COPIES, 0)}  # fmt: skip
            out.append({"model": name, "world": world, "ep": ep, "fsdp": fsdp, "checkpointing": checkpointing,
                        "rank": rank, "rows_share": share, "measured": got, "planned": want})  # fmt: skip
    return out


CASES = [("tiny", 1, 1), ("tiny", 2, 2), ("tiny", 4, 2), ("small", 1, 1), ("small", 2, 2), ("small", 4, 4)]


def variants(name: str, world: int) -> list[tuple[bool, str]]:
    """(fsdp, activation_checkpointing) pairs to measure, fewer for the larger model. FSDP (more
    than one rank) and checkpointing come in where this checkout's Trainer and ModelConfig take
    them."""
    fsdp = world > 1
    out = [(False, "none")] + ([(True, "none")] if fsdp else [])
    out += [(fsdp, "full"), (fsdp, "selective")] if name == "tiny" else [(fsdp, "selective")]
    return out


def main() -> None:
    """Print docs/scaling.md's table: the busiest rank of each case (``python -m tests.plan_measure``)."""
    print("| model | ranks | ep | fsdp | checkpointing | model state, measured / planned | activations measured, MB "
          "| planned, MB | ratio | expert rows / T*K |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, world, ep in CASES:
        runs = variants(name, world)
        rows = compare(name, world, ep, runs)
        for fsdp, ac in runs:
            mine = [r for r in rows if (r["fsdp"], r["checkpointing"]) == (fsdp, ac)]
            state = max(sum(r["measured"][k] for k in STATE) / sum(r["planned"][k] for k in STATE) for r in mine)
            top = max(mine, key=lambda r: r["measured"]["activations"])
            m, p = top["measured"]["activations"], top["planned"]["activations"]
            print(f"| {name} | {world} | {ep} | {'on' if fsdp else 'off'} | {ac} | {state:.4f} | {m / 1e6:.2f} | "
                  f"{p / 1e6:.2f} | {m / p:.3f} | {top['rows_share']:.2f} |", flush=True)  # fmt: skip


STATE = ("params", "grads", "optimizer")


def bench() -> None:
    """docs/benchmarks.md's table: ``small`` on 2 and 4 CPU ranks, with and without FSDP and
    activation checkpointing: the busiest rank's measured state + activations beside the plan, and
    the median step time (``python -m tests.plan_measure --bench``)."""
    runs = [(False, "none"), (True, "none"), (True, "full"), (True, "selective")]
    print("| ranks | ep | fsdp | checkpointing | state MB, measured / planned | activations MB, measured / planned "
          "| planned total MB (with transient) | step s (median of 3) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for world, ep in ((2, 2), (4, 2)):
        for fsdp, ac in runs:  # fresh ranks per variant: nothing of one variant lingers into the next
            rows = compare("small", world, ep, [(fsdp, ac)], seq_len=128, micro_batch=2, timed_steps=3)
            top = max(rows, key=lambda r: sum(r["measured"][k] for k in (*STATE, "activations")))
            m, p = top["measured"], top["planned"]
            step = sorted(r["measured"]["step_s"] for r in rows)[len(rows) // 2]
            print(f"| {world} | {ep} | {'on' if fsdp else 'off'} | {ac} | {sum(m[k] for k in STATE) / 1e6:.1f} / "
                  f"{sum(p[k] for k in STATE) / 1e6:.1f} | {m['activations'] / 1e6:.1f} / {p['activations'] / 1e6:.1f} "
                  f"| {p['total'] / 1e6:.1f} | {step:.2f} |", flush=True)  # fmt: skip


def gpu() -> None:
    """The issue's GPU check, for a machine with one CUDA GPU (torch alone: no Ray or Hydra needed):
    two layers of ``mixtral`` at seq 4096, one sequence, one rank, in each checkpointing mode.
    Prints measured against planned bytes, and the allocator's peak against the plan's total
    (``python -m tests.plan_measure --gpu``).

    Autocast's bf16 weight copies are planned as transient, but the matmuls save them for the
    backward, so the liveness count of activations includes them where blocks are not recomputed:
    both sums are printed.
    """
    runs = [(False, "none"), (False, "full"), (False, "selective")]
    print("| checkpointing | model state GB, measured / planned | activations GB, measured | planned "
          "| planned + autocast copies | peak allocated GB | planned total GB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for fsdp, ac in runs:
        (row,) = compare("mixtral", 1, 1, [(fsdp, ac)], seq_len=4096, micro_batch=1, n_layers=2, device="cuda")
        m, p = row["measured"], row["planned"]
        copies = p["autocast_copies"]
        gb = 1e9
        print(f"| {ac} | {sum(m[k] for k in STATE) / gb:.2f} / {sum(p[k] for k in STATE) / gb:.2f} "
              f"| {m['activations'] / gb:.2f} | {p['activations'] / gb:.2f} | {(p['activations'] + copies) / gb:.2f} "
              f"| {m['peak_allocated'] / gb:.2f} | {p['total'] / gb:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    import sys

    gpu() if "--gpu" in sys.argv else bench() if "--bench" in sys.argv else main()
