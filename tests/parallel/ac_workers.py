"""Per-rank functions of the activation-checkpointing tests (spawned processes import them)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_cluster.train import Trainer
from moe_cluster.train.trainer import local_layout
from moe_cluster.train.step import loss_fn
from tests.parallel import workers
from tests.parallel.fsdp_workers import global_view

def make_trainer(mode: str, ep: int, fsdp: bool | None, aux_loss_coef: float) -> Trainer:
    """The small EP test model (expert bias on), grad_accum=2, clipping active."""
    model = dataclasses.replace(workers.small_model(aux_loss_coef=aux_loss_coef), activation_checkpointing=mode)
    train = workers.train_config(grad_accum=2)
    return Trainer(model, train, workers.DATA, local_layout(model, train, ep=ep, fsdp=fsdp))


class _CollectiveCounter(TorchDispatchMode):
    """Counts the EP collectives: the all-to-alls (rows, counts) and the counts' all-reduce."""

    OPS = (torch.ops._c10d_functional.all_to_all_single.default, torch.ops._c10d_functional.all_reduce.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.OPS
        return func(*args, **(kwargs or {}))


def backward_collectives(trainer: Trainer) -> int:
    """EP collectives run by one micro-batch's backward (its own all-to-alls plus any recompute's)."""
    inputs, targets = trainer._micro_batches()[0]
    loss, _ = loss_fn(trainer.model, inputs, targets)
    counter = _CollectiveCounter()
    with counter:
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.count


def run(mode: str, ep: int = 1, fsdp: bool | None = False, aux_loss_coef: float = 0.01, steps: int = 3) -> dict:
    """Per optimizer step: loss, aux loss, grad norm, every (synced, clipped) gradient, expert counts."""
    trainer = make_trainer(mode, ep, fsdp, aux_loss_coef)
    out = []
    for _ in range(steps):
        m = trainer.train_step()
        grads = {n: p.grad for n, p in trainer.model.named_parameters()}
        out.append({
            "loss": m["loss"], "aux_loss": m["aux_loss"], "grad_norm": m["grad_norm"],
            "expert_counts": m["expert_counts"], "grads": global_view(trainer, grads),
            "expert_bias": [layer.router.expert_bias.clone() for layer in trainer.model.moe_layers()],
        })  # fmt: skip
    return {"steps": out, "backward_collectives": backward_collectives(trainer) if ep > 1 else 0}


def run_all(modes: list[str], aux_loss_coefs: list[float], ep: int, fsdp: bool | None) -> dict:
    """``run`` for each (mode, aux_loss_coef), one after another in this rank's process (one spawn)."""
    return {(mode, aux): run(mode, ep, fsdp, aux) for aux in aux_loss_coefs for mode in modes}


@contextlib.contextmanager
def one_thread():
    """For in-process runs: these models are tiny, one thread is fastest, and on a busy machine a
    second thread's OpenMP barriers made a 30 ms step take seconds (launched ranks get 1 each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
