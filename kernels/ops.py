"""Differentiable MoE data-plane ops with a choice of backend.

Tiers, as in the rest of ``moe_kernels``: Triton kernels (``triton_permute.py``, ``triton_grouped_gemm.py``)
and the eager CPU path (``eager.py``) both implement one small backend interface; the
``autograd.Function``s here call whichever backend was chosen, and the public functions
validate their inputs first. ``reference.py`` holds the readable versions they are tested
against.

Legend: T tokens, K slots per token, S = K*T slots (slot-major), E experts, D features,
R grouped rows, N output features.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from . import eager
from .mlp import ExpertMLPFunction, GradientBuffers, activation_forward, check_activation

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend and check that the choice can run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        # Triton on GPUs; on CPU the eager path is the fast one (the interpreter is for tests).
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' got tensors on {device}; Triton runs on CUDA devices, or on CPU "
                "with TRITON_INTERPRET=1 set before import (slow, for tests); use backend='torch' on CPU"
            )
    return backend


def _impl(backend: str):
    if backend == "torch":
        return _EagerBackend
    return _TritonBackend


class _EagerBackend:
    route_and_permute = staticmethod(eager.route_and_permute)
    combine = staticmethod(eager.combine)
    grouped_mm = staticmethod(eager.grouped_mm)
    grouped_mm_weight_grad = staticmethod(eager.grouped_mm_weight_grad)

    @staticmethod
    def combine_backward(grad_y_TD, out_RD, row_map_S, src_R, weight_TK, padded):
        return eager.combine_backward(grad_y_TD, out_RD, src_R, weight_TK)


class _TritonBackend:
    @staticmethod
    def route_and_permute(*args):
        from . import triton_permute

        return triton_permute.route_and_permute(*args)

    @staticmethod
    def combine(*args):
        from . import triton_permute

        return triton_permute.combine(*args)

    @staticmethod
    def combine_backward(grad_y_TD, out_RD, row_map_S, src_R, weight_TK, padded):
        from . import triton_permute

        return triton_permute.combine_backward(grad_y_TD, out_RD, row_map_S, weight_TK, padded)

    @staticmethod
    def grouped_mm(*args, **kwargs):
        from . import triton_grouped_gemm

        return triton_grouped_gemm.grouped_mm(*args, **kwargs)

    @staticmethod
    def grouped_mm_weight_grad(*args):
        from . import triton_grouped_gemm

        return triton_grouped_gemm.grouped_mm_weight_grad(*args)


@dataclass(frozen=True)
class RoutingPlan:
    """Where every (token, slot) went in the grouped layout; made by ``permute``.

    Slots are numbered slot-major (s = k*T + t) and grouped stably in that order, so an expert
    over capacity keeps all first choices before any second choice, earlier tokens first.
    """

    row_map_S: torch.Tensor  # [S] grouped row of each slot, -1 if dropped
    src_R: torch.Tensor  # [R] slot held by each grouped row, -1 for padding rows
    counts_E: torch.Tensor  # [E] rows kept per expert; groups are contiguous in expert order
    routed_E: torch.Tensor  # [E] slots routed to each expert before capacity
    num_tokens: int
    top_k: int
    padded: bool  # True when a capacity is set: rows past sum(counts_E) are zero padding
    backend: str

    @property
    def row_map_TK(self) -> torch.Tensor:
        return self.row_map_S.view(self.top_k, self.num_tokens).t()

    @property
    def dropped(self) -> torch.Tensor:
        """Number of slots dropped for capacity (0-dim tensor)."""
        return self.routed_E.sum() - self.counts_E.sum()


def num_grouped_rows(num_tokens: int, top_k: int, num_experts: int, capacity: int | None) -> int:
    slots = num_tokens * top_k
    return slots if capacity is None else min(slots, num_experts * capacity)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, expert_TK, num_experts, capacity, backend):
        T, K = expert_TK.shape
        num_rows = num_grouped_rows(T, K, num_experts, capacity)
        x_RD, row_map_S, src_R, kept_E, routed_E = _impl(backend).route_and_permute(
            x_TD, expert_TK, num_experts, capacity, num_rows
        )
        ctx.mark_non_differentiable(row_map_S, src_R, kept_E, routed_E)
        ctx.save_for_backward(row_map_S)
        ctx.backend, ctx.num_tokens = backend, T
        return x_RD, row_map_S, src_R, kept_E, routed_E

    @staticmethod
    def backward(ctx, grad_x_RD, *_):
        (row_map_S,) = ctx.saved_tensors
        # dx[t] = sum_k grad[row(t, k)]: the combine with unit weights, a gather.
        grad_x_TD = _impl(ctx.backend).combine(grad_x_RD.contiguous(), row_map_S, None, ctx.num_tokens)
        return grad_x_TD, None, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_RD, weight_TK, row_map_S, src_R, padded, backend):
        ctx.save_for_backward(out_RD, weight_TK, row_map_S, src_R)
        ctx.backend, ctx.padded = backend, padded
        return _impl(backend).combine(out_RD, row_map_S, weight_TK, weight_TK.shape[0])

    @staticmethod
    def backward(ctx, grad_y_TD):
        out_RD, weight_TK, row_map_S, src_R = ctx.saved_tensors
        grad_out_RD, grad_w_TK = _impl(ctx.backend).combine_backward(
            grad_y_TD.contiguous(), out_RD, row_map_S, src_R, weight_TK, ctx.padded
        )
        return grad_out_RD, grad_w_TK, None, None, None, None


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RK, w_EKN, counts_E, padded, backend):
        ctx.save_for_backward(x_RK, w_EKN, counts_E)
        ctx.backend, ctx.padded = backend, padded
        return _impl(backend).grouped_mm(x_RK, w_EKN, counts_E, padded=padded)

    @staticmethod
    def backward(ctx, grad_y_RN):
        x_RK, w_EKN, counts_E = ctx.saved_tensors
        impl = _impl(ctx.backend)
        grad_y_RN = grad_y_RN.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = impl.grouped_mm(grad_y_RN, w_EKN, counts_E, trans_w=True, padded=ctx.padded)
        if ctx.needs_input_grad[1]:
            grad_w = impl.grouped_mm_weight_grad(x_RK, grad_y_RN, counts_E)
        return grad_x, grad_w, None, None, None


def _check_2d(name: str, t: torch.Tensor, last: int | None = None, last_name: str = "") -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if last is not None and t.shape[1] != last:
        raise ValueError(f"{name} has last dimension {t.shape[1]}, expected {last} ({last_name})")


def _is_padded(num_tokens: int, top_k: int, capacity: int | None) -> bool:
    return capacity is not None and capacity < num_tokens * top_k


def _check_routing(expert_TK: torch.Tensor, num_experts: int, capacity: int | None) -> None:
    _check_2d("expert_idx", expert_TK)
    if expert_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_idx must be an integer tensor, got {expert_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be None (dropless) or >= 0, got {capacity}")
    if expert_TK.device.type == "cpu" and expert_TK.numel():
        lo, hi = int(expert_TK.min()), int(expert_TK.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_idx holds values in [{lo}, {hi}], outside [0, {num_experts})")


def _check_grouped(x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, name: str = "w") -> None:
    _check_2d("x", x_RK)
    if w_EKN.dim() != 3:
        raise ValueError(f"{name} must be 3-D [experts, in, out], got shape {tuple(w_EKN.shape)}")
    if w_EKN.shape[1] != x_RK.shape[1]:
        raise ValueError(f"x has {x_RK.shape[1]} features but {name} expects {w_EKN.shape[1]}")
    if counts_E.shape != (w_EKN.shape[0],):
        raise ValueError(f"counts has shape {tuple(counts_E.shape)}, expected ({w_EKN.shape[0]},)")
    if x_RK.dtype != w_EKN.dtype:
        raise ValueError(f"x is {x_RK.dtype} but {name} is {w_EKN.dtype}; cast one of them")


def permute(
    x_TD: torch.Tensor,
    expert_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, RoutingPlan]:
    """Group the T*K (token, slot) rows by expert.

    Returns the grouped rows ``x_RD`` (expert 0's rows first) and the ``RoutingPlan`` that
    ``unpermute`` and ``grouped_mm`` need. With ``capacity`` each expert keeps at most that many
    rows and the rest of its slots are dropped (see ``RoutingPlan`` for the order).
    """
    _check_2d("x", x_TD)
    _check_routing(expert_TK, num_experts, capacity)
    if expert_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"expert_idx has {expert_TK.shape[0]} tokens but x has {x_TD.shape[0]}")
    backend = resolve_backend(backend, x_TD.device)
    x_RD, row_map_S, src_R, kept_E, routed_E = _Permute.apply(
        x_TD.contiguous(), expert_TK.long(), num_experts, capacity, backend
    )
    T, K = expert_TK.shape
    plan = RoutingPlan(row_map_S, src_R, kept_E, routed_E, T, K, _is_padded(T, K, capacity), backend)
    return x_RD, plan


def unpermute(out_RD: torch.Tensor, weight_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Combine the grouped rows back per token: ``y[t] = sum_k weight[t, k] * out[row(t, k)]``."""
    _check_2d("out", out_RD)
    if out_RD.shape[0] != plan.src_R.numel():
        raise ValueError(f"out has {out_RD.shape[0]} rows; the plan's grouped layout has {plan.src_R.numel()}")
    if tuple(weight_TK.shape) != (plan.num_tokens, plan.top_k):
        raise ValueError(f"weight has shape {tuple(weight_TK.shape)}, expected ({plan.num_tokens}, {plan.top_k})")
    return _Unpermute.apply(out_RD.contiguous(), weight_TK, plan.row_map_S, plan.src_R, plan.padded, plan.backend)


def grouped_mm(
    x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, *, padded: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` for contiguous groups of ``counts_E[e]`` rows.

    Rows past ``counts_E.sum()`` give zeros. ``padded=False`` promises that the counts cover
    every row (the dropless case), which lets the fast paths skip zero-filling.
    """
    _check_grouped(x_RK, w_EKN, counts_E)
    backend = resolve_backend(backend, x_RK.device)
    return _GroupedMM.apply(x_RK.contiguous(), w_EKN, counts_E, padded, backend)


def expert_mlp(
    x_RD: torch.Tensor,
    w_up_EDU: torch.Tensor,
    w_down_EHD: torch.Tensor,
    counts_E: torch.Tensor,
    activation: str,
    *,
    padded: bool = True,
    backend: str = "auto",
    grad_buffers: GradientBuffers | None = None,
) -> torch.Tensor:
    """Each expert's MLP on its group of rows: ``act(x @ w_up[e]) @ w_down[e]``.

    ``activation`` is "gelu" (w_up is [E, D, H]) or "swiglu" (w_up is [E, D, 2H], gate then up).
    ``grad_buffers`` (eager path on CPU) recycles the weight-gradient buffers across steps.
    """
    check_activation(activation)
    _check_grouped(x_RD, w_up_EDU, counts_E, "w_up")
    hidden = w_up_EDU.shape[2] // 2 if activation == "swiglu" else w_up_EDU.shape[2]
    if w_down_EHD.dim() != 3 or w_down_EHD.shape[:2] != (w_up_EDU.shape[0], hidden):
        raise ValueError(
            f"w_down has shape {tuple(w_down_EHD.shape)}, expected ({w_up_EDU.shape[0]}, {hidden}, out) "
            f"for w_up {tuple(w_up_EDU.shape)} and activation={activation!r}"
        )
    backend = resolve_backend(backend, x_RD.device)
    if backend == "torch":
        return ExpertMLPFunction.apply(
            x_RD.contiguous(), None, w_up_EDU, w_down_EHD, counts_E.tolist(), None, activation, _on_cpu(grad_buffers, x_RD)
        )
    h_RU = grouped_mm(x_RD, w_up_EDU, counts_E, padded=padded, backend=backend)
    return grouped_mm(activation_forward(h_RU, activation), w_down_EHD, counts_E, padded=padded, backend=backend)


def route(expert_TK: torch.Tensor, num_experts: int, capacity: int | None = None, backend: str = "auto") -> RoutingPlan:
    """The grouped layout of ``permute`` without moving any data."""
    _check_routing(expert_TK, num_experts, capacity)
    backend = resolve_backend(backend, expert_TK.device)
    T, K = expert_TK.shape
    num_rows = num_grouped_rows(T, K, num_experts, capacity)
    no_features = torch.empty(T, 0, device=expert_TK.device)
    _, row_map_S, src_R, kept_E, routed_E = _impl(backend).route_and_permute(
        no_features, expert_TK.long(), num_experts, capacity, num_rows
    )
    return RoutingPlan(row_map_S, src_R, kept_E, routed_E, T, K, _is_padded(T, K, capacity), backend)


def moe_mlp(
    x_TD: torch.Tensor,
    expert_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    w_up_EDU: torch.Tensor,
    w_down_EHD: torch.Tensor,
    activation: str,
    *,
    capacity: int | None = None,
    backend: str = "auto",
    grad_buffers: GradientBuffers | None = None,
) -> tuple[torch.Tensor, RoutingPlan]:
    """The routed experts of an MoE layer on one device: ``y[t] = sum_k w[t,k] * mlp_e(x[t])``.

    Equal to ``permute`` -> ``expert_mlp`` -> ``unpermute``, which is what runs with Triton;
    the eager backend fuses the three (see ``ExpertMLPFunction``).
    """
    backend = resolve_backend(backend, x_TD.device)
    if backend != "torch":
        x_RD, plan = permute(x_TD, expert_TK, w_up_EDU.shape[0], capacity, backend=backend)
        out_RD = expert_mlp(x_RD, w_up_EDU, w_down_EHD, plan.counts_E, activation, padded=plan.padded, backend=backend)
        return unpermute(out_RD, weight_TK, plan), plan
    _check_2d("x", x_TD)
    plan = route(expert_TK, w_up_EDU.shape[0], capacity, backend=backend)
    if tuple(weight_TK.shape) != tuple(expert_TK.shape):
        raise ValueError(f"weight has shape {tuple(weight_TK.shape)}, expected {tuple(expert_TK.shape)} like expert_idx")
    check_activation(activation)
    _check_grouped(x_TD, w_up_EDU, plan.counts_E, "w_up")
    src_R = plan.src_R.clamp(min=0)  # padding rows are outside every group: never read
    gate_R = weight_TK.t().reshape(-1).index_select(0, src_R).to(x_TD.dtype)
    token_R = src_R % plan.num_tokens
    counts = plan.counts_E.tolist()
    y_TD = ExpertMLPFunction.apply(
        x_TD.contiguous(), gate_R, w_up_EDU, w_down_EHD, counts, token_R, activation, _on_cpu(grad_buffers, x_TD)
    )
    return y_TD, plan


def _on_cpu(grad_buffers: GradientBuffers | None, x: torch.Tensor) -> GradientBuffers | None:
    # Only CPU needs recycling: CUDA's caching allocator already reuses freed blocks.
    return grad_buffers if x.device.type == "cpu" else None
