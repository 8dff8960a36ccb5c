"""One optimizer step: micro-batches, gradient sync, clipping, update, expert-bias update."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..parallel import ProcessGroups, clip_grad_norm, is_sharded, sync_gradients
from .optim import OptimConfig, lr_at, set_lr


class Diverged(ArithmeticError):
    """The loss or the gradient norm is not finite: the run has diverged (``trainer.nan_policy``)."""


def finite_everywhere(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Whether the loss and the gradient norm are finite on every rank: one vote, so that all
    ranks skip or stop together (a rank that updated alone would leave the replicas apart)."""
    ok = (torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.detach())).to(torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def loss_fn(
    model: nn.Module, inputs_BS: torch.Tensor, targets_BS: torch.Tensor, forward: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss for backward, cross-entropy alone), both means over this rank's tokens.

    ``forward`` runs the model when it is wrapped (the DeepSpeed engine); ``model`` is the
    Transformer itself, whose MoE layers hold the balancing losses of that forward.
    """
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if inputs_BS.is_cuda else contextlib.nullcontext()
    )
    with autocast:
        logits_BSV = (forward or model)(inputs_BS)
    ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
    return ce + model.pop_aux_loss(), ce


def run_micro_batches(
    model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], backward, forward: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Forward and ``backward(loss)`` per micro-batch.

    Returns the mean loss, the mean cross-entropy, and each MoE layer's tokens per expert summed
    over the micro-batches (for the expert-bias update).
    """
    n = len(micro_batches)
    total = ce_total = 0.0
    moe_layers = model.moe_layers()
    counts = [0] * len(moe_layers)
    for inputs, targets in micro_batches:
        loss, ce = loss_fn(model, inputs, targets, forward)
        backward(loss)
        total += loss.detach() / n
        ce_total += ce.detach() / n
        counts = [c + layer.stats.tokens_per_expert for c, layer in zip(counts, moe_layers)]
    return total, ce_total, counts


def update_expert_bias(model: nn.Module, counts: list[torch.Tensor], rate: float) -> None:
    """The auxiliary-loss-free balancing step of every MoE layer that has an expert bias."""
    if rate <= 0:
        return
    for layer, c in zip(model.moe_layers(), counts):
        if layer.router.expert_bias is not None:
            layer.update_expert_bias(c, rate)


def step_metrics(total: torch.Tensor, ce_total: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict:
    return {"loss": total, "ce_loss": ce_total, "aux_loss": total - ce_total, "grad_norm": grad_norm, "lr": lr}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    groups: ProcessGroups,
    cfg: OptimConfig,
    bias_update_rate: float = 0.0,
) -> dict:
    """Run optimizer step ``step`` on this rank's micro-batches; returns metrics (this rank's view).

    A step whose loss or gradient norm is not finite on any rank changes nothing and returns
    ``skipped: True`` on every rank.
    """
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    sharded, done = is_sharded(model), [0]

    def backward(loss):
        if sharded:  # accumulate unsharded gradients; reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(done[0] == n - 1)
        done[0] += 1
        (loss / n).backward()

    total, ce_total, counts = run_micro_batches(model, micro_batches, backward)
    sync_gradients(model, groups)
    grad_norm = clip_grad_norm(model, groups, cfg.grad_clip)
    if not finite_everywhere(total, grad_norm):
        # Nothing of this step reaches the weights, the optimizer's moments or the expert bias;
        # the caller applies trainer.nan_policy (stop, or count the skip).
        optimizer.zero_grad(set_to_none=True)
        return {**step_metrics(total, ce_total, grad_norm, lr), "skipped": True}
    optimizer.step()
    update_expert_bias(model, counts, bias_update_rate)
    return step_metrics(total, ce_total, grad_norm, lr)
