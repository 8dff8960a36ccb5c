"""Eager torch implementations of the data-plane ops: the fast path on CPU.

Every step here is a gather, a per-expert GEMM or a fused elementwise op; nothing scatters
with atomics, and the backward passes are gathers too (``index_add`` and advanced-index
assignment are several times slower on CPU). The per-expert GEMMs (``cpu_gemm``: oneDNN for
fp32) write into slices of one preallocated output, so no concatenation follows.

Legend as in ``reference.py``: T tokens, K slots, E experts, D/N features, R grouped rows,
S = K*T slots numbered slot-major (s = k*T + t).
"""

from __future__ import annotations

import torch

from .cpu_gemm import mm_into


def route(expert_TK: torch.Tensor, num_experts: int, capacity: int | None):
    """Grouped layout of the slots: ``(row_map_S, src_R, kept_E, routed_E)``, as in the reference."""
    T, K = expert_TK.shape
    S = T * K
    expert_S = expert_TK.t().reshape(-1)
    # A stable sort keeps slot-major order inside each expert: that order decides who is dropped.
    src_S = torch.argsort(expert_S, stable=True)
    routed_E = torch.bincount(expert_S, minlength=num_experts)
    if capacity is None or capacity >= S:
        kept_E = routed_E
        src_R = src_S
        row_map_S = torch.empty_like(src_S)
        row_map_S[src_S] = torch.arange(S, device=expert_TK.device)
        return row_map_S, src_R, kept_E, routed_E
    start_E = torch.cumsum(routed_E, 0) - routed_E
    rank_S = torch.arange(S, device=expert_TK.device) - start_E.repeat_interleave(routed_E)
    keep_S = rank_S < capacity
    kept_E = routed_E.clamp(max=capacity)
    kept_src = src_S[keep_S]
    row_map_S = torch.full_like(src_S, -1)
    row_map_S[kept_src] = torch.arange(kept_src.numel(), device=expert_TK.device)
    return row_map_S, _pad(kept_src, min(S, num_experts * capacity)), kept_E, routed_E


def _pad(src: torch.Tensor, num_rows: int) -> torch.Tensor:
    if src.numel() == num_rows:
        return src
    return torch.cat([src, src.new_full((num_rows - src.numel(),), -1)])


def gather_rows(x_TD: torch.Tensor, src_R: torch.Tensor):
    """out[r] = x[src[r] % T]; rows with src = -1 are zero."""
    T = x_TD.shape[0]
    valid_R = src_R >= 0
    dense = bool(valid_R.all())
    src = src_R if dense else src_R.clamp(min=0)
    out_RD = x_TD.index_select(0, src % T)
    if not dense:
        out_RD.mul_(valid_R.to(out_RD.dtype).unsqueeze(1))
    return out_RD


def combine(out_RD: torch.Tensor, row_map_S: torch.Tensor, weight_TK: torch.Tensor | None, T: int):
    """y[t] = sum_k weight[t, k] * out[row_map[k*T + t]] (weight 1 when None); -1 rows add nothing."""
    K = row_map_S.numel() // T
    if out_RD.shape[0] == 0:  # capacity 0: every slot was dropped
        return out_RD.new_zeros(T, out_RD.shape[1])
    y_TD = None
    for k in range(K):
        rows_T = row_map_S[k * T : (k + 1) * T]
        valid_T = rows_T >= 0
        dense = bool(valid_T.all())
        part_TD = out_RD.index_select(0, rows_T if dense else rows_T.clamp(min=0))
        scale_T = None if weight_TK is None else weight_TK[:, k].to(out_RD.dtype)
        if not dense:
            mask_T = valid_T.to(out_RD.dtype)
            scale_T = mask_T if scale_T is None else scale_T * mask_T
        if scale_T is not None:
            part_TD.mul_(scale_T.unsqueeze(1))
        y_TD = part_TD if y_TD is None else y_TD.add_(part_TD)
    return y_TD


def combine_backward(grad_y_TD, out_RD, src_R, weight_TK):
    """Gradients of ``combine`` w.r.t. out (grouped rows) and weight, both computed by gathers."""
    T, K = weight_TK.shape
    weight_S = weight_TK.t().reshape(-1)
    valid_R = src_R >= 0
    src = src_R if bool(valid_R.all()) else src_R.clamp(min=0)
    grad_RD = grad_y_TD.index_select(0, src % T)
    if not bool(valid_R.all()):
        grad_RD.mul_(valid_R.to(grad_RD.dtype).unsqueeze(1))
    # <grad_y[t], out[row]> per row, then placed at its slot (a permutation, so no collisions).
    grad_w_R = torch.linalg.vecdot(grad_RD.float(), out_RD.float())
    grad_w_S = torch.zeros(T * K, dtype=grad_w_R.dtype, device=grad_w_R.device)
    grad_w_S[src[valid_R]] = grad_w_R[valid_R]
    grad_out_RD = grad_RD.mul_(weight_S.index_select(0, src).to(grad_RD.dtype).unsqueeze(1))
    return grad_out_RD, grad_w_S.view(K, T).t().to(weight_TK.dtype)


def grouped_mm(x_RD, w_EDN, counts_E, trans_w: bool = False, padded: bool = True):
    """out[rows of e] = x[rows of e] @ w[e] (or w[e].T); padding rows are zero."""
    N = w_EDN.shape[1] if trans_w else w_EDN.shape[2]
    counts = counts_E.tolist()
    used = sum(counts)
    out_RN = x_RD.new_empty(x_RD.shape[0], N)
    if used < x_RD.shape[0]:
        out_RN[used:].zero_()
    start = 0
    for e, n in enumerate(counts):
        if n:
            w = w_EDN[e].t() if trans_w else w_EDN[e]
            mm_into(out_RN[start : start + n], x_RD[start : start + n], w)
        start += n
    return out_RN


def grouped_mm_weight_grad(x_RD: torch.Tensor, grad_RN: torch.Tensor, counts_E: torch.Tensor):
    """grad_w[e] = x[rows of e].T @ grad[rows of e]; experts with no rows get zeros."""
    E = counts_E.numel()
    grad_w_EDN = x_RD.new_empty(E, x_RD.shape[1], grad_RN.shape[1])
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            mm_into(grad_w_EDN[e], x_RD[start : start + n].t(), grad_RN[start : start + n])
        else:
            grad_w_EDN[e].zero_()
        start += n
    return grad_w_EDN


def route_and_permute(x_TD: torch.Tensor, expert_TK: torch.Tensor, num_experts: int, capacity, num_rows: int):
    """Grouped rows and layout: ``(x_RD, row_map_S, src_R, kept_E, routed_E)``."""
    row_map_S, src_R, kept_E, routed_E = route(expert_TK, num_experts, capacity)
    return gather_rows(x_TD, src_R), row_map_S, src_R, kept_E, routed_E
