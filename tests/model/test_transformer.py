"""The transformer: shapes, causality, tying, aux losses, presets and the FLOP count."""

import pytest
import torch

from moe_cluster.model import PRESETS, ModelConfig, MoEConfig, Transformer, flops_per_token, num_params, preset


def tiny(**kw) -> ModelConfig:
    base = dict(dim=32, n_layers=3, n_heads=4, max_seq_len=16, dense_hidden_dim=48,
                moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=24))  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_forward_shape_causality_and_aux_loss(n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(tiny(moe_every=2, first_dense_layers=0, n_kv_heads=n_kv_heads))
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 256)
    assert len(model.moe_layers()) == 2  # blocks 0 and 2
    assert model.aux_loss().requires_grad and model.aux_loss() > 0
    # The training step takes the loss, and the layers let go of it (and of the graph it holds).
    taken = model.pop_aux_loss()
    assert taken.requires_grad and taken > 0
    assert all(layer.aux_loss is None for layer in model.moe_layers()) and model.aux_loss() == 0
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8])  # the future does not leak


def test_first_dense_layers():
    cfg = tiny(first_dense_layers=1, n_layers=3)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    model = Transformer(cfg)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["DenseMLP", "MoELayer", "MoELayer"]


@pytest.mark.parametrize("tie", [True, False])
def test_tied_head_is_the_embedding_and_untied_is_not(tie):
    torch.manual_seed(0)
    model = Transformer(tiny(tie_embeddings=tie))
    shared = model.head.weight is model.embed.weight  # both names of one model
    assert shared == tie, f"tie_embeddings={tie}, but head.weight {'is' if shared else 'is not'} embed.weight"
    names = {n for n, _ in model.named_parameters()}
    assert ("head.weight" in names) == (not tie)  # a tied head is no second parameter
    # What tying means: the head reads the embedding matrix. Move the embedding row of a token the
    # input does not hold: only that token's logit moves, and only when tied.
    tokens = torch.randint(0, 200, (2, 8))
    logits = model(tokens)
    with torch.no_grad():
        model.embed.weight[250] += 1.0
    moved = model(tokens) != logits
    assert moved[..., 250].all().item() == tie, "the head does not read the embedding" if tie else "it does"
    assert not moved[..., :250].any() and not moved[..., 251:].any()
    # And its gradient holds both uses: the lookup's rows and the head's.
    model.zero_grad()
    model(tokens).logsumexp(-1).sum().backward()
    head_rows = model.embed.weight.grad[250]  # token 250 is never looked up: only the head's part
    assert bool(head_rows.abs().sum() > 0) == tie, "the head's gradient does not reach the embedding"


def test_param_count_matches_the_model():
    for cfg in (tiny(), tiny(n_kv_heads=2), tiny(first_dense_layers=1, tie_embeddings=False, moe=MoEConfig(num_experts=4, top_k=1, hidden_dim=8, shared_experts=1))):
        model = Transformer(cfg)
        assert num_params(cfg, active=False) == sum(p.numel() for p in model.parameters())


def test_mixtral_preset_has_mixtrals_size():
    # Mixtral 8x7B: 46.7B parameters, 12.9B active per token (its paper).
    cfg = PRESETS["mixtral"]
    assert num_params(cfg, active=False) / 1e9 == pytest.approx(46.7, rel=0.01)
    assert num_params(cfg, active=True) / 1e9 == pytest.approx(12.9, rel=0.01)
    expected = 6 * (num_params(cfg, active=True) - 32000 * 4096) + 12 * 32 * 4096 * 4096  # lookup is no matmul
    assert flops_per_token(cfg, 4096) == pytest.approx(expected, rel=1e-3)


def test_presets_and_errors():
    assert set(PRESETS) >= {"tiny", "small", "mixtral", "deepseek"}
    ds = PRESETS["deepseek"].moe
    assert (ds.top_k, ds.router, ds.expert_bias) == (6, "sigmoid", True) and ds.shared_experts > 0
    Transformer(preset("tiny"))  # builds
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="not divisible by model.n_heads"):
        Transformer(tiny(dim=30))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16"):
        Transformer(tiny())(torch.zeros(1, 17, dtype=torch.long))
    copy = preset("tiny")
    copy.moe.num_experts = 99
    assert PRESETS["tiny"].moe.num_experts != 99  # presets are copied, not shared


def test_sharded_init_is_the_slice_of_the_unsharded_init():
    # What each rank of the Trainer does: build on the meta device, keep a slice of the experts,
    # materialise, init. The values must be the unsharded model's, whatever the slice.
    cfg = tiny(moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=24, expert_bias=True), tie_embeddings=True)
    full = Transformer(cfg)
    full.init_weights(seed=7)
    with torch.device("meta"):
        part = Transformer(cfg)
    assert all(p.is_meta for p in part.parameters())
    for layer in part.moe_layers():
        layer.experts.w_up = torch.nn.Parameter(layer.experts.w_up[2:4])
        layer.experts.w_down = torch.nn.Parameter(layer.experts.w_down[2:4])
    part.to_empty(device="cpu")
    part.init_weights(seed=7, experts=range(2, 4))
    assert part.head.weight is part.embed.weight  # tying survives materialisation
    full_params = dict(full.named_parameters())
    for name, p in part.named_parameters():
        want = full_params[name][2:4] if name.endswith(("w_up", "w_down")) else full_params[name]
        assert torch.equal(p, want), name
    for (name, b), (_, want) in zip(part.named_buffers(), full.named_buffers()):
        assert torch.equal(b, want), name
    # Seeds matter, and the global generator seeds a model built without one.
    other = Transformer(cfg)
    other.init_weights(seed=8)
    assert not torch.equal(other.embed.weight, full.embed.weight)
    torch.manual_seed(1)
    a = Transformer(cfg)
    torch.manual_seed(1)
    assert torch.equal(Transformer(cfg).blocks[0].ffn.experts.w_up, a.blocks[0].ffn.experts.w_up)
