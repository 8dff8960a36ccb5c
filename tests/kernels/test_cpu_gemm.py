"""The CPU path's GEMMs (oneDNN for fp32) against torch.mm / F.linear, on the layouts the layer uses."""

import pytest
import torch

from moe_kernels import cpu_gemm

BIG = (256, 512, 1024)  # M, K, N over the size oneDNN is used from
ONEDNN = cpu_gemm.uses_onednn(torch.ones(BIG[0], BIG[1]), torch.ones(BIG[1], BIG[2]))


def _operands(M, K, N, a_t, b_t, gen):
    """a [M, K] and b [K, N], each either contiguous or the transposed view of a contiguous tensor."""
    a = torch.randn(K, M, generator=gen).t() if a_t else torch.randn(M, K, generator=gen)
    b = torch.randn(N, K, generator=gen).t() if b_t else torch.randn(K, N, generator=gen)
    return a, b


def test_fp32_cpu_products_use_onednn_when_torch_has_it():
    # The fast path must not be silently dead: torch's x86 wheels ship oneDNN.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    M, K, N = BIG
    assert ONEDNN
    with cpu_gemm.blas():
        assert not cpu_gemm.uses_onednn(torch.ones(M, K), torch.ones(K, N))
    assert not cpu_gemm.uses_onednn(torch.ones(M, K, dtype=torch.float64), torch.ones(K, N, dtype=torch.float64))
    assert not cpu_gemm.uses_onednn(torch.ones(M, 0), torch.ones(0, N))  # an empty reduction
    assert not cpu_gemm.uses_onednn(torch.ones(2, K), torch.ones(K, N))  # too small to gain


# Sizes off every block size, single rows, and the layer's own transposed operands.
@pytest.mark.parametrize(
    "M,K,N", [(1, 7, 5), (37, 129, 65), (255, 1023, 257), (129, 513, 1025), (0, 16, 8), (300, 1, 3)]
)
@pytest.mark.parametrize("a_t,b_t", [(False, False), (False, True), (True, False), (True, True)])
def test_mm_matches_torch_mm(M, K, N, a_t, b_t):
    # Both sides of the size threshold (255x1023x257 is just under it, 129x513x1025 just over).
    gen = torch.Generator().manual_seed(M * 7 + K + N)
    a, b = _operands(M, K, N, a_t, b_t, gen)
    assert cpu_gemm.uses_onednn(a, b) == (ONEDNN and M * K * N >= cpu_gemm.MIN_ONEDNN_MACS)
    out = cpu_gemm.mm(a, b)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.mm(a.double(), b.double()).float(), rtol=1e-5, atol=1e-5 * K**0.5)
    assert torch.equal(out, cpu_gemm.mm(a, b))  # the same bits from call to call


def test_mm_with_an_empty_reduction_is_zeros():
    out = cpu_gemm.mm(torch.randn(4, 0), torch.randn(0, 3))
    assert torch.equal(out, torch.zeros(4, 3))


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_into_a_slice_of_a_larger_buffer(accumulate):
    gen = torch.Generator().manual_seed(1)
    buf = torch.randn(3, 513, 520, generator=gen)
    before = buf.clone()
    a, b = torch.randn(257, 513, generator=gen).t(), torch.randn(257, 520, generator=gen)
    assert cpu_gemm.uses_onednn(a, b) == ONEDNN
    cpu_gemm.mm_into(buf[1], a, b, accumulate=accumulate)
    want = torch.mm(a, b) + (before[1] if accumulate else 0)
    torch.testing.assert_close(buf[1], want, rtol=1e-5, atol=1e-4)
    assert torch.equal(buf[0], before[0]) and torch.equal(buf[2], before[2])  # nothing else written


def _linear_reference(x, w, grad):
    """y = x @ w.T, dx = grad @ w, dw = grad.T @ x in float64 NumPy: no torch kernel involved."""
    x, w, grad = (t.detach().double().numpy() for t in (x, w, grad))
    return tuple(torch.from_numpy(a) for a in (x @ w.T, grad @ w, grad.T @ x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_forward_and_gradients_match_a_float64_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1030, 520, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(260, 520, generator=gen, dtype=dtype, requires_grad=True)
    grad = torch.randn(1030, 260, generator=gen, dtype=dtype)
    # fp32 takes LinearFunction's oneDNN GEMMs where torch has them; fp64 always F.linear.
    assert cpu_gemm.uses_onednn(x, w.t()) == (ONEDNN and dtype == torch.float32)
    y = cpu_gemm.linear(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    # fp32: sums of 520 or 1030 products of order-1 terms, rounded in fp32; fp64: to its rounding.
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for name, got, want in zip(("y", "grad x", "grad w"), (y, gx, gw), _linear_reference(x, w, grad)):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_linear_function_backward_in_float64():
    # LinearFunction's own backward (its three GEMMs through ``mm``), whether or not this torch
    # has oneDNN: in fp64 ``linear`` never reaches it, so it is called directly here.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1030, 520, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(260, 520, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1030, 260, generator=gen, dtype=torch.float64)
    y = cpu_gemm.LinearFunction.apply(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    for name, got, want in zip(("y", "grad x", "grad w"), (y, gx, gw), _linear_reference(x, w, grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    small = (torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True))  # fmt: skip
    assert torch.autograd.gradcheck(cpu_gemm.LinearFunction.apply, small)


def test_linear_gradient_of_the_weight_alone():
    x = torch.randn(1030, 520)
    w = torch.randn(260, 520, requires_grad=True)
    (gw,) = torch.autograd.grad(cpu_gemm.linear(x, w).sum(), (w,))
    torch.testing.assert_close(gw, x.sum(0).expand(260, 520), rtol=1e-5, atol=1e-3)


def test_blas_switch_gives_torch_mm_bits():
    a, b = torch.randn(500, 700), torch.randn(700, 300)
    with cpu_gemm.blas():
        assert torch.equal(cpu_gemm.mm(a, b), torch.mm(a, b))
