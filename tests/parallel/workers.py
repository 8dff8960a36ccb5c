"""Functions the multi-process tests run on every rank (spawned processes import them)."""

from __future__ import annotations

import torch

from moe_cluster.model import ModelConfig, MoEConfig
from moe_cluster.parallel import is_expert_param
from moe_cluster.train import DataConfig, OptimConfig, TrainConfig, Trainer
from moe_cluster.train.trainer import local_layout


def small_model(num_experts: int = 4, aux_loss_coef: float = 0.01, capacity_factor: float | None = None) -> ModelConfig:
    # expert_bias on, with a large rate: the bias moves visibly, so checkpoints must carry it.
    return ModelConfig(
        dim=32, n_layers=2, n_heads=4, max_seq_len=32, dense_hidden_dim=64, moe_every=1,
        moe=MoEConfig(num_experts=num_experts, top_k=2, hidden_dim=32, aux_loss_coef=aux_loss_coef,
                      z_loss_coef=0.001, expert_bias=True, bias_update_rate=0.05, capacity_factor=capacity_factor),
    )  # fmt: skip


def train_config(grad_clip: float = 0.05, **kw) -> TrainConfig:
    # grad_clip below the first steps' gradient norm (~0.1), so clipping really rescales.
    base = dict(global_batch_size=8, seq_len=16, seed=3, eval_every=0, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(optim=OptimConfig(lr=1e-2, warmup_steps=2, decay_steps=10, grad_clip=grad_clip), **base)


DATA = DataConfig(max_bytes=400_000)


def make_trainer(
    ep: int, checkpoint_dir: str | None = None, capacity_factor: float | None = None, fsdp: bool = False, **train_kw
) -> Trainer:
    """Unsharded state by default: these tests are about expert parallelism (test_fsdp.py shards)."""
    model, train = small_model(capacity_factor=capacity_factor), train_config(**train_kw)
    return Trainer(model, train, DATA, local_layout(model, train, ep=ep, fsdp=fsdp), checkpoint_dir=checkpoint_dir)


def global_view(trainer: Trainer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name -> tensor with expert tensors split and keyed by global expert index."""
    local = trainer.layout.local_experts(trainer.rank)
    out = {}
    for name, t in tensors.items():
        if is_expert_param(name):
            for i, e in enumerate(local):
                out[f"{name}.e{e}"] = t[i].detach().clone()
        else:
            out[name] = t.detach().clone()
    return out


def in_turn(calls: list[tuple]) -> list:
    """``[fn(*args) for (fn, *args) in calls]`` on this rank, with a barrier after each: several
    runs in one launch, since every launch spends seconds spawning ranks and importing torch."""
    out = []
    for fn, *args in calls:
        out.append(fn(*args))
        torch.distributed.barrier()  # a checkpoint one run saved is whole before the next reads it
    return out


def one_step(ep: int, capacity_factor: float | None = None) -> dict:
    """Loss, gradients and updated parameters after one optimizer step."""
    trainer = make_trainer(ep, capacity_factor=capacity_factor)
    metrics = trainer.train_step()
    params = dict(trainer.model.named_parameters())
    return {
        "loss": metrics["loss"],
        "grad_norm": metrics["grad_norm"],
        "dropped": metrics["dropped_tokens"],  # (token, slot) pairs dropped, all ranks and layers
        "grads": global_view(trainer, {n: p.grad for n, p in params.items()}),
        "params": global_view(trainer, params),
    }


def losses(ep: int, steps: int, checkpoint_dir: str | None = None, save_at: int | None = None, resume: bool = False):
    trainer = make_trainer(ep, checkpoint_dir)
    if resume and not trainer.resume():
        raise RuntimeError("no checkpoint to resume from")
    out = []
    for _ in range(steps):
        out.append(trainer.train_step()["loss"])
        if save_at is not None and trainer.step == save_at:
            trainer.save_checkpoint()
    return out



def mixtral_model(**kw) -> ModelConfig:
    """A model Mixtral can express (softmax router, SwiGLU, dropless, no shared experts or bias)."""
    base = dict(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, dense_hidden_dim=64, tie_embeddings=False,
        moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=24, aux_loss_coef=0.01, z_loss_coef=0.001),
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def train_and_save(model_cfg: ModelConfig, ep: int, steps: int, checkpoint_dir: str) -> str:
    """``model.init_from=hf:PATH`` is resolved here as the job's assembly does it (config, then weights)."""
    from moe_cluster.interop.hf_mixtral import resolve_model_config, weights_loader

    model_cfg = resolve_model_config(model_cfg)
    init = weights_loader(model_cfg.init_from) if model_cfg.init_from else None
    train = train_config(checkpoint_every=0)
    trainer = Trainer(
        model_cfg, train, DATA, local_layout(model_cfg, train, ep=ep), checkpoint_dir=checkpoint_dir, init_weights=init
    )
    for _ in range(steps):
        trainer.train_step()
    return str(trainer.save_checkpoint())


def engine_run(engine: str, ep: int, steps: int, ds: dict | None = None, checkpoint_dir: str | None = None,
               save_at: int | None = None, resume: bool = False, grad_accum: int = 1) -> dict:
    """Losses, gradient norms and final parameters of ``steps`` steps on the given engine."""
    cfg = train_config(engine=engine, grad_accum=grad_accum)
    # The native engine unsharded, as DeepSpeed's ZeRO keeps the parameters whole on every rank.
    model = small_model()
    layout = local_layout(model, cfg, ep=ep, fsdp=False if engine == "native" else None)
    trainer = Trainer(model, cfg, DATA, layout, checkpoint_dir=checkpoint_dir, deepspeed=ds)
    if resume and not trainer.resume():
        raise RuntimeError("no checkpoint to resume from")
    out = {"loss": [], "grad_norm": []}
    for _ in range(steps):
        m = trainer.train_step()
        out["loss"].append(m["loss"])
        out["grad_norm"].append(m["grad_norm"])
        if save_at is not None and trainer.step == save_at:
            trainer.save_checkpoint()
    out["params"] = global_view(trainer, dict(trainer.model.named_parameters()))
    out["expert_bias"] = [layer.router.expert_bias.clone() for layer in trainer.model.moe_layers()]
    return out


def snapshot_and_rollback(ep: int, steps: int = 3) -> dict:
    """Train, snapshot, train on; then restore the snapshot and train the same steps again."""
    trainer = make_trainer(ep)
    for _ in range(2):
        trainer.train_step()
    snap = trainer.snapshot()
    ahead = [trainer.train_step()["loss"] for _ in range(steps)]
    trainer.restore(snap)
    again = [trainer.train_step()["loss"] for _ in range(steps)]
    return {"snapshot": snap, "ahead": ahead, "again": again}


def restore_from(pieces: dict, ep: int, steps: int = 3) -> list[float]:
    """A fresh rank of another layout, rebuilt from (merged) snapshots, trains on."""
    trainer = make_trainer(ep)
    trainer.restore(pieces)
    return [trainer.train_step()["loss"] for _ in range(steps)]
