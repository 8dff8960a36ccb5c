"""``parallelize`` on one process: expert parallelism, then activation checkpointing, then the
materialised model's init, then (not on one rank) FSDP. The sharded case is tests/parallel/test_fsdp.py's
(its Trainer calls parallelize on 4 ranks)."""

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moe_cluster.model import Transformer
from moe_cluster.model.transformer import Block
from moe_cluster.parallel import Layout, build_process_groups, parallelize
from moe_cluster.parallel.mesh import ProcessGroups
from tests.parallel.workers import small_model


def _meta_model(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


def test_one_rank_applies_ac_and_init_in_order_and_no_fsdp():
    cfg = small_model()
    layout = Layout.resolve(world=1, ep=1, num_experts=cfg.moe.num_experts)  # fsdp wanted, but one rank
    model = _meta_model(cfg)
    seen = {}

    def init(m, experts):
        # By now: EP set on every MoE layer, AC on every block, the tensors real and not yet sharded.
        seen["experts"] = experts
        seen["ep"] = [layer.parallel is not None and layer.parallel.ep_size for layer in m.moe_layers()]
        seen["ac"] = [b.checkpoint_fn is not None for b in m.modules() if isinstance(b, Block)]
        seen["devices"] = {p.device.type for p in m.parameters()}
        m.init_weights(seed=7, experts=experts)

    parallelize(model, build_process_groups(layout), activation_checkpointing="full", init_weights=init, device="cpu")
    assert seen == {"experts": range(4), "ep": [1, 1], "ac": [True, True], "devices": {"cpu"}}
    assert not isinstance(model, FSDPModule) and not any(isinstance(p, DTensor) for p in model.parameters())
    want = Transformer(cfg)
    want.init_weights(seed=7)
    for (name, p), q in zip(model.named_parameters(), want.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_experts_are_split_before_the_model_is_materialised():
    # Rank 1 of ep=2 (groups of this process alone stand in for the EP group; no collective runs
    # without FSDP): it allocates and initialises only its two experts, as the whole model's 2 and 3.
    cfg = small_model()
    layout = Layout.resolve(world=2, ep=2, num_experts=cfg.moe.num_experts, fsdp=False)
    model = _meta_model(cfg)
    shapes = []

    def init(m, experts):
        shapes.extend(layer.experts.w_up.shape[0] for layer in m.moe_layers())
        m.init_weights(seed=7, experts=experts)

    groups = ProcessGroups(layout, rank=1, world=None, ep=None, expert_dp=None)
    parallelize(model, groups, activation_checkpointing="none", init_weights=init, device="cpu")
    assert shapes == [2, 2]
    assert all(b.checkpoint_fn is None for b in model.modules() if isinstance(b, Block))
    whole = Transformer(cfg)
    whole.init_weights(seed=7)
    for layer, ref in zip(model.moe_layers(), whole.moe_layers(), strict=True):
        torch.testing.assert_close(layer.experts.w_up, ref.experts.w_up[2:4], rtol=0, atol=0)


def test_unknown_checkpointing_mode_is_refused_before_anything_is_allocated():
    cfg = small_model()
    layout = Layout.resolve(world=1, ep=1, num_experts=cfg.moe.num_experts)
    model = _meta_model(cfg)
    with pytest.raises(ValueError, match="model.activation_checkpointing='some' is unknown"):
        parallelize(model, build_process_groups(layout), activation_checkpointing="some",
                    init_weights=lambda m, e: None, device="cpu")  # fmt: skip
    assert all(p.is_meta for p in model.parameters())
