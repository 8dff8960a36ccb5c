"""The experts' MLP over grouped rows: ``down(act(up(x)))`` with one weight pair per expert.

On GPUs this is two Triton grouped GEMMs around an elementwise activation. On CPU it is one
autograd function that walks the experts and runs up-GEMM, activation and down-GEMM on each
expert's rows while they are in cache (the GEMMs through ``cpu_gemm``: oneDNN for large fp32
ones); it can also gather its input rows from token order and add its gated outputs back into
token order itself (``moe_mlp`` uses that on CPU). What backward needs is kept chunk by chunk,
so no pass allocates an [R, H] tensor, nor the grouped copies of the input and output.

Why this matters on CPU: a fresh large tensor costs page faults on first touch (glibc maps
every allocation over 32 MB anew), often more than the arithmetic done on it. Measured here,
a 32 MB ``clone`` takes 11 ms into fresh memory and 1.6 ms into reused memory.

Legend: R grouped rows, E experts, D model dim, H hidden dim, U up-projection width
(H, or 2H for SwiGLU's [gate | up]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_gemm import bucket_rows, mm, mm_into

ACTIVATIONS = ("swiglu", "gelu")

# Rows per step of the CPU loop: one expert's rows are cut into chunks this long so the
# activation temporaries stay small (and reused by the allocator) however skewed the routing.
_CHUNK_ROWS = 1024


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}")


def activation_forward(h_RU: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU (exact, erf) on ``h``, or SwiGLU on ``h = [gate | up]``."""
    if activation == "gelu":
        return F.gelu(h_RU)
    gate, up = h_RU.chunk(2, dim=-1)
    return F.silu(gate) * up


def activation_backward(grad_a_RH: torch.Tensor, h_RU: torch.Tensor, activation: str) -> torch.Tensor:
    """Gradient w.r.t. the pre-activation ``h`` given the gradient of the activation's output."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_a_RH, h_RU)
    gate, up = h_RU.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    grad_gate = torch.ops.aten.silu_backward(grad_a_RH * up, gate)
    return torch.cat([grad_gate, grad_a_RH.mul_(silu_gate)], dim=-1)


class GradientBuffers:
    """Weight-gradient buffers recycled from one backward pass to the next (eager path).

    The expert weights' gradients are the largest tensors a step writes (256 MB for E=64,
    D=512, H=1024) and, under glibc, fresh ones are page-faulted in every step. A buffer is
    handed out again only when nothing but this object still references its storage, i.e.
    once the previous gradient was released (``zero_grad(set_to_none=True)``) or was added
    into an existing ``.grad``; otherwise a new buffer is made, so a gradient somebody keeps is
    never overwritten.
    """

    def __init__(self):
        # key -> (buffer, its storage's use count when nothing else referenced it)
        self._buffers: dict[tuple, tuple[torch.Tensor, int]] = {}

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(like.shape), like.dtype, like.device)
        buf, alone = self._buffers.get(key, (None, None))
        if buf is None or alone is None or _storage_use_count(buf) != alone:
            buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            self._buffers[key] = (buf, _storage_use_count(buf))
        return buf.view(buf.shape)  # a new tensor on the same storage: autograd may adopt it


def _storage_use_count(t: torch.Tensor) -> int | None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # not in this torch build: None, and nothing is ever recycled
        return None
    return use_count(t.untyped_storage()._cdata)


def _chunks(counts: list[int]):
    """(expert, first row, end row, is the expert's first chunk) for every chunk of every group."""
    start = 0
    for e, n in enumerate(counts):
        for lo in range(start, start + n, _CHUNK_ROWS):
            yield e, lo, min(lo + _CHUNK_ROWS, start + n), lo == start
        start += n


class ExpertMLPFunction(torch.autograd.Function):
    """Per-expert MLP for the eager (CPU) backend, walking the experts' groups in chunks.

    Two modes:
    - rows mode (``token_R`` is None): ``x`` holds the grouped rows [R, D] and the output is
      the grouped rows [R, D] (expert parallelism: rows arrive by all-to-all).
    - fused mode: ``x`` is in token order [T, D]; each chunk gathers its rows from ``x`` by
      ``token_R``, and its outputs, scaled by the gate weights ``gate_R``, are added into
      ``y[T, D]``. Neither the grouped input nor the grouped output is ever materialised.
      Within one expert a token appears at most once (top-k picks distinct experts), so the
      ``index_add_`` of a chunk never collides with itself. Where its GEMMs go through oneDNN
      a chunk is padded to ``cpu_gemm.ROW_BUCKET`` rows (``_bucketed``) with copies of its first
      token under a zero gate: they add nothing to any output or gradient.
    """

    @staticmethod
    def forward(ctx, x, gate_R, w_up_EDU, w_down_EHD, counts, token_R, activation, grad_buffers):
        fused = token_R is not None
        if fused:
            out = x.new_zeros(x.shape[0], w_down_EHD.shape[2])
        else:
            out = x.new_empty(x.shape[0], w_down_EHD.shape[2])
            out[sum(counts) :].zero_()
        # Pre-activations and activations are kept per chunk rather than as [R, U] tensors:
        # chunk-sized buffers are recycled by the allocator, big tensors are page-faulted anew
        # every step. (Keeping the activation costs the memory a dense MLP's autograd keeps too,
        # and saves recomputing it in backward.)
        h_chunks, a_chunks, rows_chunks = [], [], []
        for e, lo, hi, _ in _chunks(counts):
            if fused:
                tok_c, gate_c = _bucketed(token_R[lo:hi], gate_R[lo:hi], x, w_up_EDU.shape[2])
                x_c = x.index_select(0, tok_c)
                rows_chunks.append((tok_c, gate_c))
            else:
                x_c = x[lo:hi]
            h_c = mm(x_c, w_up_EDU[e])
            a_c = activation_forward(h_c, activation)
            h_chunks.append(h_c)
            a_chunks.append(a_c)
            if fused:
                # Scaled out of place: selective activation checkpointing may keep this GEMM's
                # output for the recompute, and refuses a kept tensor that was changed since.
                out_c = mm(a_c, w_down_EHD[e]) * gate_c[:, None]
                out.index_add_(0, token_R[lo:hi], out_c[: hi - lo])
            else:
                mm_into(out[lo:hi], a_c, w_down_EHD[e])
        # The per-chunk intermediates are saved like the inputs, not kept on ctx: only saved
        # tensors pass through saved-tensor hooks, which activation checkpointing uses to drop
        # them after the forward (and recompute them in backward).
        rows_saved = [t for rows_c in rows_chunks for t in rows_c]
        ctx.save_for_backward(x, gate_R, w_up_EDU, w_down_EHD, token_R, *h_chunks, *a_chunks, *rows_saved)
        ctx.num_chunks = len(h_chunks)
        ctx.counts, ctx.activation, ctx.fused = counts, activation, fused
        ctx.grad_buffers = grad_buffers
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_R, w_up_EDU, w_down_EHD, token_R, *chunks = ctx.saved_tensors
        fused, counts, C = ctx.fused, ctx.counts, ctx.num_chunks
        h_chunks, a_chunks = chunks[:C], chunks[C : 2 * C]
        rows_chunks = list(zip(chunks[2 * C :: 2], chunks[2 * C + 1 :: 2])) if fused else [None] * C
        grad_out = grad_out.contiguous()
        padded = sum(counts) < x.shape[0]
        grad_x = torch.zeros_like(x) if fused or padded else torch.empty_like(x)
        grad_gate_R = torch.zeros_like(gate_R) if fused else None
        if ctx.grad_buffers is not None:
            grad_up = ctx.grad_buffers.take("up", w_up_EDU)
            grad_down = ctx.grad_buffers.take("down", w_down_EHD)
        else:
            grad_up, grad_down = torch.empty_like(w_up_EDU), torch.empty_like(w_down_EHD)
        for e, n in enumerate(counts):
            if n == 0:  # an expert that got no rows has zero gradient
                grad_up[e].zero_()
                grad_down[e].zero_()
        for (e, lo, hi, first), h_c, a_c, rows_c in zip(_chunks(counts), h_chunks, a_chunks, rows_chunks):
            if fused:
                n = hi - lo
                tok_c, gate_c = rows_c
                g_c = grad_out.index_select(0, tok_c)
                grad_a = mm(g_c, w_down_EHD[e].t())
                # d(gate) = <grad_y, a @ w_down> = <grad_y @ w_down.T, a>: reuses grad_a.
                grad_gate_R[lo:hi] = torch.linalg.vecdot(grad_a[:n], a_c[:n])
                # Padding rows have gate 0: from here on their rows of g_c, grad_a and grad_h
                # are zeros, so they add nothing to the weight gradients.
                grad_a.mul_(gate_c[:, None])
                g_c.mul_(gate_c[:, None])
                x_c = x.index_select(0, tok_c)
            else:
                g_c = grad_out[lo:hi]
                grad_a = mm(g_c, w_down_EHD[e].t())
                x_c = x[lo:hi]
            mm_into(grad_down[e], a_c.t(), g_c, accumulate=not first)
            grad_h = activation_backward(grad_a, h_c, ctx.activation)
            mm_into(grad_up[e], x_c.t(), grad_h, accumulate=not first)
            if fused:
                grad_x.index_add_(0, token_R[lo:hi], mm(grad_h, w_up_EDU[e].t())[:n])
            else:
                mm_into(grad_x[lo:hi], grad_h, w_up_EDU[e].t())
        return grad_x, grad_gate_R, grad_up, grad_down, None, None, None, None


def _bucketed(tok_C: torch.Tensor, gate_C: torch.Tensor, x: torch.Tensor, up_width: int):
    """A chunk's token indices and gates, padded (first token, gate 0) to ``bucket_rows`` rows.

    A padding row repeats a row the chunk computes anyway, so it is finite wherever the chunk
    is, and its zero gate zeroes it before it can reach an output or a gradient.
    """
    rows = bucket_rows(tok_C.numel(), x.shape[1], up_width, x)
    extra = rows - tok_C.numel()
    if extra == 0:
        return tok_C, gate_C
    return torch.cat([tok_C, tok_C[:1].expand(extra)]), torch.cat([gate_C, gate_C.new_zeros(extra)])
