"""permute / route / unpermute against the readable references, forward and gradients."""

import pytest
import torch

from moe_kernels import permute, route, unpermute
from moe_kernels.reference import permute_reference, route_reference, unpermute_reference
from tests.kernels.helpers import assert_close, random_routing

BACKENDS = ["torch", "triton"]
# (tokens, top_k, experts, capacity, experts that get no tokens)
CASES = [
    (37, 2, 8, None, (3, 6)),
    (130, 1, 5, None, ()),
    (64, 3, 16, None, (0, 15)),
    (50, 2, 4, 20, ()),  # over capacity: drops
    (33, 2, 6, 4, (2,)),
    (20, 2, 4, 0, ()),  # capacity 0 drops everything
    (1, 1, 1, None, ()),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,capacity,empty", CASES)
def test_route_matches_reference(backend, T, K, E, capacity, empty, device):
    expert_TK = random_routing(T, K, E, empty=empty, device=device)
    plan = route(expert_TK, E, capacity, backend=backend)
    row_map, src, kept, routed = route_reference(expert_TK.cpu(), E, capacity)
    assert torch.equal(plan.row_map_S.cpu(), row_map)
    assert torch.equal(plan.src_R.cpu(), src)
    assert torch.equal(plan.counts_E.cpu(), kept)
    assert torch.equal(plan.routed_E.cpu(), routed)
    for e in empty:
        assert int(plan.routed_E[e]) == 0
    assert int(plan.dropped) == int(routed.sum() - kept.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,capacity,empty", CASES)
def test_permute_unpermute_forward_and_grads(backend, dtype, T, K, E, capacity, empty, device):
    D = 40  # not a multiple of any block size
    expert_TK = random_routing(T, K, E, empty=empty, device=device)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(T, K, device=device, dtype=dtype, requires_grad=True)

    x_RD, plan = permute(x, expert_TK, E, capacity, backend=backend)
    # A per-row transform between the two, so the gradients depend on where rows went.
    scale_R = torch.linspace(0.5, 1.5, x_RD.shape[0], device=device, dtype=dtype)
    y = unpermute(x_RD * scale_R[:, None], w, plan)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    ref_RD = permute_reference(xr, plan.src_R.cpu().to(device))
    yr = unpermute_reference(ref_RD * scale_R.float()[:, None], wr, plan.row_map_S)
    if yr.requires_grad:
        yr.backward(grad_y.float())
    else:  # capacity 0: nothing reaches the output, so every gradient is zero
        xr.grad, wr.grad = torch.zeros_like(xr), torch.zeros_like(wr)

    assert_close(x_RD, ref_RD, dtype)
    assert_close(y, yr, dtype)
    assert_close(x.grad, xr.grad, dtype)
    assert_close(w.grad, wr.grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_order_keeps_first_choices_then_earlier_tokens(backend, device):
    # Every token picks expert 0 first and expert 1 second; capacity 3 per expert.
    T = 5
    expert_TK = torch.tensor([[0, 1]] * T, device=device)
    plan = route(expert_TK, 2, capacity=3, backend=backend)
    row_map_TK = plan.row_map_TK.cpu()
    assert row_map_TK[:, 0].tolist() == [0, 1, 2, -1, -1]  # tokens 0-2 kept by expert 0
    assert row_map_TK[:, 1].tolist() == [3, 4, 5, -1, -1]  # likewise for expert 1
    assert int(plan.dropped) == 4
    # Mixed slots: expert 0 is the second choice of tokens 0-1 and the first choice of 2-4.
    expert_TK = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], device=device)
    plan = route(expert_TK, 2, capacity=3, backend=backend)
    kept_by_0 = sorted(s for s in plan.src_R.tolist()[:3])
    assert kept_by_0 == [2, 3, 4]  # first choices (slots 2, 3, 4) win over second choices


def test_bad_input_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        permute(x, torch.tensor([[0], [1], [2], [4]]), 4)
    with pytest.raises(ValueError, match="3 tokens but x has 4"):
        permute(x, torch.zeros(3, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="integer"):
        permute(x, torch.zeros(4, 1), 4)
    with pytest.raises(ValueError, match="backend='cuda' is unknown"):
        permute(x, torch.zeros(4, 1, dtype=torch.long), 4, backend="cuda")
    _, plan = permute(x, torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="weight has shape"):
        unpermute(torch.randn(4, 8), torch.ones(4, 2), plan)
