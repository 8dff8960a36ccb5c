"""grouped_mm and expert_mlp / moe_mlp against the references, forward and gradients."""

import pytest
import torch

from moe_kernels import expert_mlp, grouped_mm, moe_mlp
from moe_kernels.mlp import activation_forward
from moe_kernels.reference import grouped_mm_reference, permute_reference, unpermute_reference
from tests.kernels.helpers import assert_close, random_routing

BACKENDS = ["torch", "triton"]
# per-expert row counts: empty experts, groups shorter and longer than a block, and padding
COUNTS = [
    ([5, 0, 33, 17], 0),
    ([0, 0, 40], 0),
    ([1, 2, 3, 4, 5, 6, 7, 8], 0),
    ([9, 0, 12], 7),  # 7 padding rows after the groups
    ([0, 0], 3),
]


def _weights(E, K, N, dtype, device):
    return (torch.randn(E, K, N, device=device, dtype=dtype) / K**0.5).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts,pad", COUNTS)
def test_grouped_mm_forward_and_grads(backend, dtype, counts, pad, device):
    K, N = 48, 36  # not multiples of the block sizes
    E = len(counts)
    counts_E = torch.tensor(counts, device=device)
    R = sum(counts) + pad
    x = torch.randn(R, K, device=device, dtype=dtype, requires_grad=True)
    w = _weights(E, K, N, dtype, device)
    y = grouped_mm(x, w, counts_E, padded=pad > 0, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)

    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = grouped_mm_reference(xr, wr, counts_E)
    yr.backward(grad.float())
    assert_close(y, yr, dtype)
    assert_close(x.grad, xr.grad, dtype)
    assert_close(w.grad, wr.grad, dtype)
    if pad:
        assert torch.count_nonzero(y[-pad:]) == 0
        assert torch.count_nonzero(x.grad[-pad:]) == 0


def _mlp_reference(x_RD, w_up, w_down, counts_E, activation):
    h = grouped_mm_reference(x_RD, w_up, counts_E)
    return grouped_mm_reference(activation_forward(h, activation), w_down, counts_E)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts,pad", COUNTS[:2] + COUNTS[3:4])
def test_expert_mlp_forward_and_grads(backend, activation, counts, pad, device):
    D, H = 24, 40
    E = len(counts)
    U = 2 * H if activation == "swiglu" else H
    counts_E = torch.tensor(counts, device=device)
    x = torch.randn(sum(counts) + pad, D, device=device, requires_grad=True)
    w_up, w_down = _weights(E, D, U, torch.float32, device), _weights(E, H, D, torch.float32, device)
    y = expert_mlp(x, w_up, w_down, counts_E, activation, padded=pad > 0, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)

    leaves = [t.detach().clone().requires_grad_() for t in (x, w_up, w_down)]
    yr = _mlp_reference(*leaves, counts_E, activation)
    yr.backward(grad)
    assert_close(y, yr, torch.float32)
    for got, ref in zip((x, w_up, w_down), leaves):
        assert_close(got.grad, ref.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,capacity,empty", [(45, 2, 6, None, (1,)), (40, 3, 5, 14, ()), (30, 1, 3, None, ())])
def test_moe_mlp_forward_and_grads(backend, activation, dtype, T, K, E, capacity, empty, device):
    D, H = 24, 20
    U = 2 * H if activation == "swiglu" else H
    expert_TK = random_routing(T, K, E, empty=empty, device=device)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    gate = torch.rand(T, K, device=device, dtype=dtype, requires_grad=True)
    w_up, w_down = _weights(E, D, U, dtype, device), _weights(E, H, D, dtype, device)
    y, plan = moe_mlp(x, expert_TK, gate, w_up, w_down, activation, capacity=capacity, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)

    leaves = [t.detach().float().requires_grad_() for t in (x, gate, w_up, w_down)]
    xr, gr, ur, dr = leaves
    out = _mlp_reference(permute_reference(xr, plan.src_R), ur, dr, plan.counts_E, activation)
    yr = unpermute_reference(out, gr, plan.row_map_S)
    yr.backward(grad.float())
    assert_close(y, yr, dtype)
    for got, ref in zip((x, gate, w_up, w_down), leaves):
        assert_close(got.grad, ref.grad, dtype)


def test_eager_path_chunks_long_groups():
    # One expert with more rows than the eager path's chunk: accumulation across chunks.
    T, D, H = 2100, 8, 12
    expert_TK = torch.zeros(T, 1, dtype=torch.long)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(T, 1, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(1, D, H, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(1, H, D, dtype=torch.float64, requires_grad=True)
    y, _ = moe_mlp(x, expert_TK, gate, w_up, w_down, "gelu", backend="torch")
    y.square().sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate, w_up, w_down)]
    xr, gr, ur, dr = leaves
    yr = gr * (torch.nn.functional.gelu(xr @ ur[0]) @ dr[0])
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr)
    for got, ref in zip((x, gate, w_up, w_down), leaves):
        torch.testing.assert_close(got.grad, ref.grad)


def test_grouped_mm_errors():
    x, w = torch.randn(10, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="x has 6 features but w expects 8"):
        grouped_mm(torch.randn(10, 6), w, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="counts has shape"):
        grouped_mm(x, w, torch.tensor([10]))
    with pytest.raises(ValueError, match="cast one of them"):
        grouped_mm(x.double(), w, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="w must be 3-D"):
        grouped_mm(x, w[0], torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="activation='relu' is unknown"):
        expert_mlp(x, w, torch.randn(2, 4, 8), torch.tensor([5, 5]), "relu")
