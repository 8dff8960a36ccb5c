"""Readable eager references for the MoE data-plane ops.

Every fast path in this package (Triton kernels, the CPU fast path) is tested against these
functions, forward and gradients. They are plain differentiable torch code written for clarity,
not speed: autograd derives their backward.

Shape legend: T tokens, K slots per token (top-k), E experts, D feature size, N output features,
R rows of the grouped layout (<= T*K; rows past the last kept row are padding).

Slots are numbered slot-major, ``s = k * T + t``: all tokens' first choices come before any
second choice. Grouping is stable in that order, so when an expert is over capacity it keeps the
first-choice slots first and, among slots of the same rank, the earlier tokens.
"""

from __future__ import annotations

import torch


def route_reference(expert_TK: torch.Tensor, num_experts: int, capacity: int | None):
    """Return ``(row_map_S, src_R, kept_E, routed_E)`` for the grouped layout.

    row_map_S[s]: grouped row of slot s, or -1 when the slot was dropped.
    src_R[r]: slot held by grouped row r, or -1 for padding rows.
    kept_E / routed_E: rows each expert keeps / slots routed to it before capacity.
    """
    T, K = expert_TK.shape
    expert_S = expert_TK.t().reshape(-1)
    routed_E = torch.bincount(expert_S, minlength=num_experts)
    cap = T * K if capacity is None else capacity
    kept_E = routed_E.clamp(max=cap)
    start_E = torch.cumsum(kept_E, 0) - kept_E
    num_rows = T * K if capacity is None else min(T * K, num_experts * capacity)
    row_map_S = torch.full((T * K,), -1, dtype=torch.long, device=expert_TK.device)
    src_R = torch.full((num_rows,), -1, dtype=torch.long, device=expert_TK.device)
    seen_E = [0] * num_experts
    for s, e in enumerate(expert_S.tolist()):
        if seen_E[e] < cap:
            row = int(start_E[e]) + seen_E[e]
            row_map_S[s] = row
            src_R[row] = s
        seen_E[e] += 1
    return row_map_S, src_R, kept_E, routed_E


def permute_reference(x_TD: torch.Tensor, src_R: torch.Tensor) -> torch.Tensor:
    """Grouped rows: row r holds the token of slot src_R[r]; padding rows are zero."""
    T = x_TD.shape[0]
    rows = []
    for s in src_R.tolist():
        rows.append(x_TD[s % T] if s >= 0 else torch.zeros_like(x_TD[0]))
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def grouped_mm_reference(x_RD: torch.Tensor, w_EDN: torch.Tensor, counts_E: torch.Tensor):
    """Rows [start_e, start_e + counts_E[e]) are multiplied by w_EDN[e]; other rows give zero."""
    out = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        out.append(x_RD[start : start + n] @ w_EDN[e])
        start += n
    pad = x_RD.shape[0] - start
    out.append(x_RD.new_zeros(pad, w_EDN.shape[2]))
    return torch.cat(out)


def unpermute_reference(out_RD: torch.Tensor, weight_TK: torch.Tensor, row_map_S: torch.Tensor):
    """y[t] = sum_k weight[t, k] * out[row_map[k*T + t]]; dropped slots add nothing."""
    T, K = weight_TK.shape
    y = []
    for t in range(T):
        acc = out_RD.new_zeros(out_RD.shape[1])
        for k in range(K):
            row = int(row_map_S[k * T + t])
            if row >= 0:
                acc = acc + weight_TK[t, k].to(out_RD.dtype) * out_RD[row]
        y.append(acc)
    return torch.stack(y)
