"""Per-rank functions of the FSDP tests (spawned processes import them)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from moe_cluster.parallel import is_expert_param
from moe_cluster.train import Trainer
from moe_cluster.train.trainer import local_layout
from tests.parallel import workers


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a rank's view (collective for DTensors: every rank calls it alike)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def global_view(trainer: Trainer, tensors: dict) -> dict:
    local = trainer.layout.local_experts(trainer.rank)
    out = {}
    for name, t in tensors.items():
        t = full(t)
        if is_expert_param(name):
            out.update({f"{name}.e{e}": t[i] for i, e in enumerate(local)})
        else:
            out[name] = t
    return out


def make_trainer(
    ep: int, fsdp, checkpoint_dir=None, aux_loss_coef: float = 0.0, num_experts: int = 4, **train_kw
) -> Trainer:
    """grad_accum=2 by default. The balancing loss is off by default: it is defined per micro-batch
    over the data-parallel ranks, so with accumulation its micro-batches hold other sequences on
    one process than on several (the z-loss and everything else are per-token means, unchanged)."""
    kw = dict(grad_accum=2)
    kw.update(train_kw)
    model, train = workers.small_model(num_experts=num_experts, aux_loss_coef=aux_loss_coef), workers.train_config(**kw)
    return Trainer(model, train, workers.DATA, local_layout(model, train, ep=ep, fsdp=fsdp), checkpoint_dir=checkpoint_dir)


def local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def state_bytes(trainer: Trainer) -> dict:
    """This rank's bytes of parameters and of AdamW moments, as allocated."""
    params = list(trainer.model.parameters())
    moments = [s[k] for s in trainer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {"params": local_bytes(params), "optimizer": local_bytes(moments)}


def run(ep: int, fsdp, checkpoint_dir: str | None = None, n: int = 3, save_at: int = 2, **kw) -> dict:
    """``n`` steps: loss, grad norm and every gradient (global view) after each; the state's bytes;
    after step ``save_at`` a checkpoint (with ``checkpoint_dir``) and this rank's snapshot."""
    trainer = make_trainer(ep, fsdp, checkpoint_dir=checkpoint_dir, **kw)
    out, snapshot = [], None
    for _ in range(n):
        m = trainer.train_step()
        params = dict(trainer.model.named_parameters())
        out.append({
            "loss": m["loss"], "grad_norm": m["grad_norm"],
            "grads": global_view(trainer, {k: p.grad for k, p in params.items()}),
        })  # fmt: skip
        if trainer.step == save_at:
            trainer.evaluate()  # a forward alone: the weights must be shards again after it
            snapshot = trainer.snapshot()
            if checkpoint_dir:
                trainer.save_checkpoint()
    return {"steps": out, "bytes": state_bytes(trainer), "snapshot": snapshot}


def resume_and_restore(ep: int, fsdp, checkpoint_dir: str, snapshots: list[dict] | None, **kw) -> tuple:
    """The next step's loss after resuming the checkpoint, and after restoring the union of
    ``snapshots`` (another layout's ranks'), each into a fresh Trainer of this layout."""
    trainer = make_trainer(ep, fsdp, checkpoint_dir=checkpoint_dir, **kw)
    if not trainer.resume():
        raise RuntimeError("no checkpoint to resume from")
    resumed = trainer.train_step()["loss"]
    if snapshots is None:
        return resumed, None
    trainer = make_trainer(ep, fsdp, **kw)
    merged = {}
    for snap in snapshots:
        merged.update(snap)
    trainer.restore(merged)
    return resumed, trainer.train_step()["loss"]
