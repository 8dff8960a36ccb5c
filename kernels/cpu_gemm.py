"""Matrix products for the eager CPU path: oneDNN for large fp32 GEMMs, else ``torch.mm``.

``torch.mm`` on CPU calls the BLAS torch was built with (MKL in the x86 wheels). On the AMD
EPYC (AVX-512) machines this project is developed on, MKL reaches about 160 GFLOP/s in fp32
on two cores, the AVX2 peak, while oneDNN, which picks its kernels from the ISA the CPU
reports, reaches about 400 GFLOP/s on the same GEMM. At the benchmark's E=64 shapes (256 rows
per expert) the expert GEMMs run 1.4x (weight gradients) to 2.4x (forward, input gradients)
faster through it (docs/benchmarks.md).

torch reaches oneDNN for a plain fp32 GEMM only through ``torch.ops.mkldnn._linear_pointwise``,
an inner product ``x @ w.T`` (the op Inductor emits for CPU linears), so ``mm`` calls that with
``w = b.T``. Its results agree with ``torch.mm`` to fp32 rounding (another summation order, so
not bitwise) and are the same from call to call.

The choice follows torch's own switch, ``torch.backends.mkldnn.enabled``: inside ``with
blas():`` (which turns it off) every product here runs through ``torch.mm``; the benchmark
compares the two that way. Small GEMMs (``MIN_ONEDNN_MACS``), other dtypes (fp64 for gradcheck;
bf16, whose CPU ``torch.mm`` already uses oneDNN where the CPU supports it) and other devices
always take ``torch.mm``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def blas():
    """Context manager: products inside it (forward and backward) use ``torch.mm``."""
    # allow_tf32=None leaves that flag alone: setting it, to any value, warns on CPU-only builds.
    return torch.backends.mkldnn.flags(enabled=False, allow_tf32=None)


@functools.cache
def _onednn_linear():
    """The oneDNN inner-product op, or None when this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):  # an op namespace raises on unknown names
        return None


# oneDNN compiles a kernel for every new GEMM shape (0.2-0.5 ms each, measured here) and keeps
# 1024 in its cache; the routing changes every expert's row count each step, so most expert
# GEMMs of a run are new shapes. Only a GEMM this large saves more than that (the 256-row
# expert GEMMs of the benchmark, 2**27 multiply-adds, take 1.4 ms through MKL and 0.6 ms through
# oneDNN). Below it torch.mm is faster: through oneDNN the tiny preset's expert GEMMs (about
# 2**25) made a training step 25-35% slower, and a larger cache doubled the process's memory.
MIN_ONEDNN_MACS = 1 << 26


# Row counts of GEMMs that go through oneDNN are rounded up to a multiple of this by callers
# that can pad (``bucket_rows``), so that a few shapes, compiled once, serve every step: at 256
# rows per expert that is 3% more arithmetic against a 0.2-0.5 ms compile per new shape.
ROW_BUCKET = 16


def uses_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``mm(a, b)`` goes through oneDNN (else ``torch.mm``)."""
    return a.device == b.device and _onednn_for(a.dtype, b.dtype, a.device, a.shape[0] * a.shape[1] * b.shape[1])


def bucket_rows(rows: int, k: int, n: int, like: torch.Tensor) -> int:
    """How many rows to run a ``[rows, k] @ [k, n]`` product of ``like``'s dtype and device with:
    ``rows`` rounded up to a multiple of ``ROW_BUCKET`` where that product goes through oneDNN,
    ``rows`` itself where it does not (``torch.mm`` has no per-shape cost)."""
    padded = -(-rows // ROW_BUCKET) * ROW_BUCKET
    return padded if _onednn_for(like.dtype, like.dtype, like.device, padded * k * n) else rows


def _onednn_for(a_dtype, b_dtype, device: torch.device, macs: int) -> bool:
    return (
        a_dtype == torch.float32
        and b_dtype == torch.float32
        and device.type == "cpu"
        and macs >= MIN_ONEDNN_MACS
        and torch.backends.mkldnn.enabled
        and _onednn_linear() is not None
    )


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors, either of which may be a transposed or sliced view.

    oneDNN reads ``b`` through its strides (it repacks the weight operand anyway) and makes
    ``a`` contiguous first, so pass the smaller operand as ``a`` when one must be copied.
    """
    if uses_onednn(a_MK, b_KN):
        return _onednn_linear()(a_MK, b_KN.t(), None, "none", [], "")
    return torch.mm(a_MK, b_KN)


def mm_into(out_MN: torch.Tensor, a_MK: torch.Tensor, b_KN: torch.Tensor, accumulate: bool = False) -> None:
    """``out = a @ b`` (or ``out += a @ b``), ``out`` being a view into a larger buffer."""
    if not uses_onednn(a_MK, b_KN):
        if accumulate:
            out_MN.addmm_(a_MK, b_KN)
        else:
            torch.mm(a_MK, b_KN, out=out_MN)
        return
    # The op has no out= form: the product lands in a fresh (allocator-recycled) tensor and is
    # copied or added in; at the expert GEMMs' sizes that costs a few percent of the GEMM.
    if accumulate:
        out_MN.add_(mm(a_MK, b_KN))
    else:
        out_MN.copy_(mm(a_MK, b_KN))


class LinearFunction(torch.autograd.Function):
    """``x @ w.T`` (``F.linear`` without bias) whose three GEMMs all go through ``mm``."""

    @staticmethod
    def forward(ctx, x_RI, w_OI):
        ctx.save_for_backward(x_RI, w_OI)
        return mm(x_RI, w_OI.t())

    @staticmethod
    def backward(ctx, grad_RO):
        x_RI, w_OI = ctx.saved_tensors
        grad_RO = grad_RO.contiguous()
        grad_x = mm(grad_RO, w_OI) if ctx.needs_input_grad[0] else None
        grad_w = mm(grad_RO.t(), x_RI) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def linear(x_RI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for 2-D ``x``: its three GEMMs through oneDNN where ``mm`` would use
    it, plain ``F.linear`` otherwise (other dtypes and devices keep autograd's own formula)."""
    if x_RI.dim() == 2 and uses_onednn(x_RI, w_OI.t()):
        return LinearFunction.apply(x_RI, w_OI)
    return F.linear(x_RI, w_OI)
