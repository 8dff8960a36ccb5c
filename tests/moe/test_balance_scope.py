"""The sequence-wise balancing loss: each sequence's own expert shares, so that the objective is the
same however the global batch is split into ranks and micro-batches (model.moe.balance_scope)."""

import dataclasses

import pytest
import torch

from moe_cluster.moe import MoELayer
from moe_cluster.moe.router import load_balancing_loss, sequence_balancing_loss
from moe_cluster.train import Trainer
from tests.parallel.workers import DATA, small_model, train_config


def test_the_sequence_loss_is_the_mean_of_each_sequence_alone():
    g = torch.Generator().manual_seed(0)
    B, S, E, K = 3, 7, 5, 2  # sizes off any block
    probs_BSE = torch.rand(B, S, E, generator=g).softmax(-1)
    expert_BSK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)]).view(B, S, K)
    alone = [load_balancing_loss(probs_BSE[b], torch.bincount(expert_BSK[b].flatten(), minlength=E), K) for b in range(B)]
    assert sequence_balancing_loss(probs_BSE, expert_BSK) == pytest.approx(float(torch.stack(alone).mean()), rel=1e-6)
    # Uniform routing scores 1, total collapse onto one expert scores E, as the Switch loss does.
    uniform = torch.full((1, 5, E), 1.0 / E)
    spread = torch.tensor([[[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]])  # every expert chosen twice
    assert sequence_balancing_loss(uniform, spread) == pytest.approx(1.0)
    collapsed = torch.zeros(1, 3, E)
    collapsed[..., 0] = 1.0
    assert sequence_balancing_loss(collapsed, torch.zeros(1, 3, 1, dtype=torch.long)) == pytest.approx(E)


def test_a_layer_scores_a_batch_as_its_sequences_one_by_one():
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, 2, aux_loss_coef=1.0, z_loss_coef=0.0, balance_scope="sequence")
    x_BSD = torch.randn(4, 6, 16)
    layer(x_BSD)
    whole = float(layer.stats.load_balancing_loss)
    each = []
    for b in range(4):
        layer(x_BSD[b : b + 1])
        each.append(float(layer.stats.load_balancing_loss))
    assert whole == pytest.approx(sum(each) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="balance_scope='token' is unknown"):
        MoELayer(16, 24, 4, 2, balance_scope="token")


def _losses(scope: str, grad_accum: int, steps: int = 5) -> list[float]:
    base = small_model(aux_loss_coef=0.1)  # a balancing loss large enough to matter
    model = dataclasses.replace(base, moe=dataclasses.replace(base.moe, balance_scope=scope))
    trainer = Trainer(model, train_config(grad_accum=grad_accum), DATA)
    return [trainer.train_step()["loss"] for _ in range(steps)]


def test_the_same_objective_at_any_micro_batch_split():
    # One micro-batch of 8 sequences against 4 of 2 (what a heal that halves the world does to
    # each rank): with sequence-wise shares every step's loss agrees to float reassociation; with
    # per-micro-batch shares the objective itself differs, and so do the losses.
    one, four = _losses("sequence", 1), _losses("sequence", 4)
    assert max(abs(a - b) / abs(a) for a, b in zip(one, four)) < 1e-6
    one, four = _losses("micro_batch", 1), _losses("micro_batch", 4)
    assert max(abs(a - b) / abs(a) for a, b in zip(one, four)) > 1e-5
