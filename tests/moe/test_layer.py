"""MoELayer against a naive per-token reference, gradcheck, special cases and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_cluster import MoELayer
from moe_cluster.moe import load_balancing_loss, z_loss
from moe_kernels import expert_mlp, permute, unpermute


def naive_routing(layer: MoELayer, x_TD: torch.Tensor):
    """(scores_TE, chosen_TK, keep_TK): the router's scores and choices, and which (token, slot)
    pairs survive the capacity, decided one by one in the documented order."""
    r = layer.router
    logits_TE = F.linear(x_TD.float(), r.weight.float())  # batched, so top-k ties break alike
    T = x_TD.shape[0]
    scores_TE = logits_TE.softmax(-1) if r.score == "softmax" else logits_TE.sigmoid()
    choice_TE = scores_TE if r.expert_bias is None else scores_TE + r.expert_bias
    chosen_TK = choice_TE.topk(layer.top_k, dim=-1).indices
    cap = math.inf
    if layer.capacity_factor is not None:
        cap = math.ceil(layer.capacity_factor * T * layer.top_k / layer.num_experts)
    taken = [0] * layer.num_experts
    keep = torch.zeros(T, layer.top_k, dtype=torch.bool)  # on CPU: read element by element
    for k in range(layer.top_k):  # documented drop order: slot-major, then token order
        for t in range(T):
            e = int(chosen_TK[t, k])
            keep[t, k] = taken[e] < cap
            taken[e] += 1
    return scores_TE, chosen_TK, keep


def naive_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token: score, choose, run each chosen expert, weigh, add (and drop as documented)."""
    scores_TE, chosen_TK, keep = naive_routing(layer, x_TD)
    r, T = layer.router, x_TD.shape[0]
    ex = layer.experts
    rows = []
    for t in range(T):
        w = scores_TE[t, chosen_TK[t]]
        if r.normalize_weights:
            w = w / w.sum()
        y = torch.zeros_like(x_TD[t])
        for k in range(layer.top_k):
            if keep[t, k]:
                e = int(chosen_TK[t, k])
                h = x_TD[t] @ ex.w_up[e]
                if ex.activation == "gelu":
                    a = F.gelu(h)
                else:
                    g, u = h.chunk(2)
                    a = F.silu(g) * u
                y = y + w[k].to(x_TD.dtype) * (a @ ex.w_down[e])
        if layer.shared is not None:
            y = y + layer.shared(x_TD[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows)


LAYERS = [
    dict(activation="swiglu"),
    dict(activation="gelu", router="sigmoid", top_k=3),
    dict(activation="swiglu", capacity_factor=0.75),
    dict(activation="gelu", shared_experts=2, top_k=1),
    dict(activation="swiglu", router="sigmoid", expert_bias=True, shared_experts=1),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kwargs", LAYERS)
def test_layer_matches_naive_reference(kwargs, backend, device):
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    top_k = kwargs.pop("top_k", 2)
    layer = MoELayer(24, 20, 6, top_k, backend=backend, **kwargs).to(device)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.randn(6) * 0.1)
    x = torch.randn(3, 11, 24, device=device, requires_grad=True)  # 33 tokens, leading dims flattened
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    got_x = x.grad.clone()

    layer.zero_grad()
    x.grad = None
    yr = naive_moe(layer, x.view(-1, 24)).view_as(x)
    yr.backward(grad)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_x, x.grad, atol=1e-5, rtol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    if layer.capacity_factor is not None:
        assert int(layer.stats.dropped_tokens) > 0  # the case really drops


def test_eager_path_gradcheck_float64():
    torch.manual_seed(1)
    layer = MoELayer(6, 5, 4, 2, activation="swiglu", shared_experts=1, backend="torch").double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    # Router choices are piecewise constant; this seed keeps every top-k far from a tie.
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_one_expert_top1_is_the_dense_mlp():
    torch.manual_seed(2)
    for activation in ("gelu", "swiglu"):
        layer = MoELayer(16, 32, 1, 1, activation=activation)
        x = torch.randn(10, 16, requires_grad=True)
        y = layer(x)
        h = x @ layer.experts.w_up[0]
        a = F.gelu(h) if activation == "gelu" else F.silu(h[:, :32]) * h[:, 32:]
        torch.testing.assert_close(y, a @ layer.experts.w_down[0])
        assert layer.stats.tokens_per_expert.tolist() == [10]


def test_aux_losses_on_hand_made_routing():
    # 4 tokens, 2 experts, top-1: tokens 0-2 go to expert 0, token 3 to expert 1.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.0, 2.0]])
    probs = logits.softmax(-1)
    routed = torch.tensor([3, 1])
    f = routed.float() / 4
    expected_lb = 2 * (f[0] * probs[:, 0].mean() + f[1] * probs[:, 1].mean())
    torch.testing.assert_close(load_balancing_loss(probs, routed, 1), expected_lb)
    expected_z = (torch.log(logits.exp().sum(-1)) ** 2).mean()
    torch.testing.assert_close(z_loss(logits), expected_z)
    uniform = torch.full((8, 4), 0.25)
    torch.testing.assert_close(load_balancing_loss(uniform, torch.tensor([4, 4, 4, 4]), 2), torch.tensor(1.0))

    # The layer reports the same numbers and weighs them into aux_loss.
    layer = MoELayer(2, 4, 2, 1, aux_loss_coef=0.1, z_loss_coef=0.01)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    layer(logits)
    assert layer.stats.tokens_per_expert.tolist() == [3, 1]
    torch.testing.assert_close(layer.stats.load_balancing_loss, expected_lb)
    torch.testing.assert_close(layer.stats.z_loss, expected_z)
    torch.testing.assert_close(layer.aux_loss, 0.1 * expected_lb + 0.01 * expected_z)
    assert layer.aux_loss.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_capacity_drops_exactly_the_overflow(backend, device):
    torch.manual_seed(3)
    E, K, T, cf = 4, 2, 40, 0.5
    layer = MoELayer(8, 8, E, K, capacity_factor=cf, backend=backend).to(device)
    x = torch.randn(T, 8, device=device)
    y = layer(x)
    cap = math.ceil(cf * T * K / E)
    routed = layer.stats.tokens_per_expert
    assert int(layer.stats.dropped_tokens) == int((routed - routed.clamp(max=cap)).sum())
    _, _, keep_TK = naive_routing(layer, x)
    keep_TK = keep_TK.to(device)
    lost_all, lost_some, lost_none = ~keep_TK.any(1), keep_TK.any(1) & ~keep_TK.all(1), keep_TK.all(1)
    assert lost_all.any() and lost_some.any() and lost_none.any()  # the three cases all occur here
    # Tokens whose every slot was dropped get exactly zero output (no shared experts here), also
    # through permute -> expert_mlp -> unpermute, the path expert parallelism takes (on CPU the
    # layer fuses the three).
    routing = layer.router(x)
    x_RD, plan = permute(x, routing.expert_TK, E, cap, backend=backend)
    out_RD = expert_mlp(x_RD, layer.experts.w_up, layer.experts.w_down, plan.counts_E, "swiglu", backend=backend)
    y_unfused = unpermute(out_RD, routing.weight_TK, plan)
    for name, out in (("layer", y), ("permute/unpermute", y_unfused)):
        assert torch.equal(out[lost_all], torch.zeros_like(out[lost_all])), f"{name}: {out[lost_all].abs().max()}"
    torch.testing.assert_close(y_unfused, y, atol=1e-5, rtol=1e-5)
    # Tokens that lost nothing get what the dropless layer gives them; those that lost a slot do not.
    dropless = MoELayer(8, 8, E, K, backend=backend).to(device)
    dropless.load_state_dict(layer.state_dict())
    y_dropless = dropless(x)
    torch.testing.assert_close(y[lost_none], y_dropless[lost_none], atol=1e-5, rtol=1e-5)
    assert not torch.isclose(y[lost_some], y_dropless[lost_some], atol=1e-5, rtol=1e-5).all(1).any()
    torch.testing.assert_close(naive_moe(layer, x), y, atol=1e-5, rtol=1e-5)


def test_expert_bias_moves_towards_balance():
    layer = MoELayer(8, 8, 4, 1, expert_bias=True)
    layer.update_expert_bias(torch.tensor([10, 0, 5, 5]), rate=0.1)
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    with pytest.raises(ValueError, match="expert_bias=True"):
        MoELayer(8, 8, 4, 1).update_expert_bias(torch.ones(4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(top_k=5), "top_k=5 exceeds num_experts=4"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(hidden_dim=-3), "hidden_dim must be a positive integer"),
        (dict(num_experts=0, top_k=1), "num_experts must be a positive integer"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(activation="relu"), "activation='relu' is unknown"),
        (dict(router="random"), "router='random' is unknown"),
        (dict(backend="cuda"), "backend='cuda' is unknown"),
        (dict(capacity_factor=0), "capacity_factor must be None"),
        (dict(shared_experts=-1), "shared_experts must be >= 0"),
    ],
)
def test_constructor_errors(kwargs, message):
    args = dict(dim=8, hidden_dim=16, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MoELayer(**args)


def test_wrong_last_dimension():
    layer = MoELayer(8, 16, 4, 2)
    with pytest.raises(ValueError, match="last dimension is 7, but the layer was built with dim=8"):
        layer(torch.randn(3, 7))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = MoELayer(8, 16, 4, 2, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        layer(torch.randn(3, 8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_layer_tracks_fp32(backend, device):
    torch.manual_seed(4)
    layer16 = MoELayer(32, 32, 4, 2, backend=backend).to(device, torch.bfloat16)
    layer32 = MoELayer(32, 32, 4, 2, backend=backend).to(device)
    layer32.load_state_dict({k: v.float() for k, v in layer16.state_dict().items()})
    x16 = torch.randn(16, 32, device=device).bfloat16()
    y16 = layer16(x16)
    assert y16.dtype == torch.bfloat16
    # The router runs in fp32 on the same rounded values, so both make the same choices.
    torch.testing.assert_close(y16.float(), layer32(x16.float()), atol=5e-2, rtol=5e-2)


def test_recycled_weight_gradients_are_never_overwritten_while_held():
    torch.manual_seed(5)
    layer = MoELayer(8, 12, 4, 2, activation="gelu")
    w = layer.experts.w_up
    layer(torch.randn(20, 8)).sum().backward()
    kept = w.grad  # the user holds on to this gradient
    kept_values = kept.clone()
    w.grad = None
    layer(torch.randn(20, 8)).sum().backward()
    assert w.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, kept_values)  # untouched by the second backward

    # Released gradients are recycled: the next one lands in the same memory.
    ptr = w.grad.data_ptr()
    layer.zero_grad(set_to_none=True)
    layer(torch.randn(20, 8)).sum().backward()
    if not hasattr(torch._C, "_storage_Use_Count"):
        pytest.skip("this torch build cannot tell whether a buffer is still referenced: no recycling")
    assert w.grad.data_ptr() == ptr


def test_gradients_accumulate_across_backward_passes():
    torch.manual_seed(6)
    layer = MoELayer(8, 12, 4, 2)
    x1, x2 = torch.randn(20, 8), torch.randn(20, 8)
    layer(x1).sum().backward()
    layer(x2).sum().backward()  # no zero_grad: adds into the existing .grad
    accumulated = {n: p.grad.clone() for n, p in layer.named_parameters()}
    expected = {}
    for x in (x1, x2):
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        for n, p in layer.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad.clone()
    for n in accumulated:
        torch.testing.assert_close(accumulated[n], expected[n], msg=n)


def test_layer_at_onednn_sizes_matches_its_torch_mm_path(monkeypatch):
    """GEMMs large enough for oneDNN, with a padded chunk, an expert split in chunks and an
    expert with no tokens, against the same layer with every GEMM on torch.mm (itself checked
    against the naive reference above)."""
    from moe_kernels import cpu_gemm

    op = cpu_gemm._onednn_linear()
    if op is None:
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(3)
    layer = MoELayer(200, 272, 8, 2, activation="swiglu", router="sigmoid", expert_bias=True, backend="torch")
    # Expert 0 takes every token (three chunks, the last one padded); expert 7 none; the rest
    # about 500 rows each, under oneDNN's size: both GEMM paths in one layer.
    layer.router.expert_bias.copy_(torch.tensor([2.0, 0, 0, 0, 0, 0, 0, -100.0]))
    x = torch.randn(3001, 200, requires_grad=True)
    grad = torch.randn_like(x)

    rows_seen = []  # a spy: the real op runs

    def spy(x_MK, *args):
        rows_seen.append(x_MK.shape[0])
        return op(x_MK, *args)

    monkeypatch.setattr(cpu_gemm, "_onednn_linear", lambda: spy)

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y.backward(grad)
        return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    y, gx, grads = run()
    counts = layer.stats.tokens_per_expert.tolist()
    assert counts[7] == 0 and counts[0] > 1024
    assert rows_seen, "no GEMM went through oneDNN"
    assert all(r % cpu_gemm.ROW_BUCKET == 0 for r in rows_seen if r not in (200, 272, 544))  # token rows padded
    tail = counts[0] % 1024  # expert 0's last chunk (chunks are 1024 rows)
    assert tail % cpu_gemm.ROW_BUCKET and -(-tail // cpu_gemm.ROW_BUCKET) * cpu_gemm.ROW_BUCKET in rows_seen
    with cpu_gemm.blas():
        y_ref, gx_ref, grads_ref = run()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4, msg=name)
    assert torch.equal(grads["experts.w_up"][7], torch.zeros(200, 544))
