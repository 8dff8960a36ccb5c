"""Activation checkpointing on one process: the same numbers as without it, less memory kept.

The multi-rank (EP, FSDP) versions are in tests/parallel/test_activation_checkpointing.py.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import set_checkpoint_early_stop

from moe_cluster.model import ModelConfig, MoEConfig, Transformer, architecture_differences
from moe_cluster.parallel import apply_activation_checkpointing
from moe_cluster.parallel.checkpointing import kept_activation_bytes
from tests.parallel import ac_workers

MODES = ("none", "full", "selective")
# A recompute repeats the forward's arithmetic exactly: only the fp32 reassociation a kernel
# might do differently would show, and it does not (the runs are bitwise equal today).
EXACT = dict(rtol=1e-6, atol=0.0)


def config(**kw) -> ModelConfig:
    """Every feature a block has: a dense block, GQA, shared experts, expert bias, capacity drops."""
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, dense_hidden_dim=96,
                first_dense_layers=1,
                moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=64, shared_experts=1, expert_bias=True,
                              aux_loss_coef=0.01, z_loss_coef=0.001, capacity_factor=1.0))  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def forward_backward(mode: str, cfg: ModelConfig, tokens_BS: torch.Tensor, early_stop: bool = True) -> dict:
    model = Transformer(cfg)
    model.init_weights(seed=1)
    with torch.no_grad():  # a nonzero bias, so that it really takes part in the routing
        for layer in model.moe_layers():
            layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, layer.num_experts))
    apply_activation_checkpointing(model, mode)

    def forward():
        logits_BSV = model(tokens_BS[:, :-1])
        return F.cross_entropy(logits_BSV.flatten(0, 1), tokens_BS[:, 1:].flatten()) + model.aux_loss()

    # What autograd saves, by saved-tensor hooks (each storage once, parameters not counted).
    # Meaningful without checkpointing only: inside a block checkpointing's own hooks take over.
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in weights:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, kept = kept_activation_bytes(forward)
    layers = model.moe_layers()
    aux = [layer.aux_loss for layer in layers]
    stats = [dataclasses.astuple(layer.stats) for layer in layers]
    with set_checkpoint_early_stop(early_stop):
        loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "kept": kept,
        "saved_by_hooks": sum(saved.values()),
        # The MoE layers' side effects of the forward, and what they are after a backward that
        # may have recomputed the blocks.
        "aux": [a.detach() for a in aux],
        "aux_after": [layer.aux_loss.detach() for layer in layers],
        "stats": stats,
        "stats_after": [dataclasses.astuple(layer.stats) for layer in layers],
        "names": [n for n, _ in model.named_parameters()],
        "state_keys": list(model.state_dict()),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with ac_workers.one_thread():
        yield


@pytest.fixture(scope="module")
def tokens_BS():
    return torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tokens_BS):
    return forward_backward("none", config(), tokens_BS)


def assert_same(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], **EXACT)
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, **EXACT, msg=name)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gradients_and_side_effects_equal_none(mode, early_stop, reference, tokens_BS):
    got = forward_backward(mode, config(), tokens_BS, early_stop)
    assert_same(got, reference)
    assert sum(s[1] for s in reference["stats"]) > 0  # capacity drops happen: the padded path runs
    # A recompute runs the MoE layers' forward again (with early stop off, all of it): the aux
    # losses and statistics are assigned, not accumulated, so they keep the forward's values.
    for key in ("aux", "aux_after"):
        for a, b in zip(got[key], reference["aux"]):
            torch.testing.assert_close(a, b, **EXACT)
    for key in ("stats", "stats_after"):
        for a, b in zip(got[key], reference["stats"]):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, **EXACT)
    # No wrapper module: parameter and state-dict names (checkpoints, FSDP) are unchanged.
    assert got["names"] == reference["names"] and got["state_keys"] == reference["state_keys"]


def test_kept_activation_memory_drops(tokens_BS):
    # Wider experts than the other tests: the expert activations dominate, as in real models.
    cfg = config(moe=dataclasses.replace(config().moe, hidden_dim=256, capacity_factor=None))
    runs = {mode: forward_backward(mode, cfg, tokens_BS) for mode in MODES}
    kept = {mode: run["kept"] for mode, run in runs.items()}
    # Without checkpointing, what the forward leaves alive is what autograd saved (to 1%: the
    # token ids are saved but not made in the forward, the MoE statistics alive but not saved).
    assert runs["none"]["saved_by_hooks"] == pytest.approx(kept["none"], rel=0.01)
    # full keeps each block's input; selective the matmul outputs too; none everything.
    assert kept["full"] < 0.4 * kept["none"], kept
    assert kept["full"] < kept["selective"] < 0.8 * kept["none"], kept


def test_three_steps_with_accumulation_and_clipping_equal_none():
    runs = {mode: ac_workers.run(mode) for mode in MODES}  # one process, grad_accum=2, expert bias on
    want = runs["none"]["steps"]
    assert want[0]["grad_norm"] > ac_workers.workers.train_config().optim.grad_clip  # clipping takes part
    for mode in ("full", "selective"):
        for step, (got, ref) in enumerate(zip(runs[mode]["steps"], want)):
            for key in ("loss", "aux_loss", "grad_norm"):
                assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=0), (mode, step, key)
            assert got["expert_counts"] == ref["expert_counts"], (mode, step)
            for a, b in zip(got["expert_bias"], ref["expert_bias"]):
                torch.testing.assert_close(a, b, **EXACT)
            for name, g in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], g, **EXACT, msg=f"{mode} step {step} {name}")


def test_evaluation_without_grad_runs_plainly(tokens_BS):
    model = Transformer(config())
    model.init_weights(seed=1)
    with torch.no_grad():
        want = model(tokens_BS[:, :-1])
        apply_activation_checkpointing(model, "selective")
        torch.testing.assert_close(model(tokens_BS[:, :-1]), want, **EXACT)


def test_validation_and_resume_compatibility():
    with pytest.raises(ValueError, match=r"activation_checkpointing='partial' is unknown; use one of: none, full, sel"):
        Transformer(config(activation_checkpointing="partial"))
    with pytest.raises(ValueError, match=r"model.activation_checkpointing='x' is unknown"):
        apply_activation_checkpointing(Transformer(config()), "x")
    # A training-only key: a run may resume with another mode, and from a checkpoint written
    # before the key existed.
    saved = dataclasses.asdict(config())
    assert architecture_differences(saved, dataclasses.asdict(config(activation_checkpointing="full"))) == []
    del saved["activation_checkpointing"]
    assert architecture_differences(saved, dataclasses.asdict(config(activation_checkpointing="selective"))) == []
