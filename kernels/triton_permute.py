"""Triton kernels that move rows between token order and the grouped (expert-sorted) layout.

Routing is two launches. ``_histogram_kernel`` counts each block's slots per expert.
``_route_scatter_kernel`` then fuses, per block, the prefix sums (over earlier blocks and over
experts), the capacity check, and the scatter of the token rows into the grouped buffer. The
result is deterministic and stable in slot order (no atomics), which fixes who is dropped when
an expert is over capacity.

``_combine_kernel`` gathers grouped rows back per token and sums them with the gate weights
(``unpermute``); with no weights it is also the backward of ``permute``.
``_combine_backward_kernel`` gives the gradients of the combine: the rows' gradients (a gather
of the output gradient, scaled) and the gate weights' gradients (row dot products), in one pass.

Legend: T tokens, K slots, S = K*T slots (slot-major, s = k*T + t), E experts, D features,
R grouped rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _histogram_kernel(
    expert_ptr,  # [S] expert of each slot
    hist_ptr,  # [num_blocks, BLOCK_E] out: slots per expert in each block
    S,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    expert = tl.load(expert_ptr + slots, mask=slots < S, other=-1)
    experts = tl.arange(0, BLOCK_E)
    onehot = (expert[:, None] == experts[None, :]).to(tl.int64)
    tl.store(hist_ptr + pid * BLOCK_E + experts, tl.sum(onehot, axis=0))


@triton.jit
def _route_scatter_kernel(
    expert_ptr,  # [S] expert of each slot
    hist_ptr,  # [num_blocks, BLOCK_E] from _histogram_kernel
    x_ptr,  # [T, D] token rows
    out_ptr,  # [R, D] out: grouped rows
    row_map_ptr,  # [S] out: grouped row of each slot, -1 if dropped
    src_ptr,  # [R] out: slot of each grouped row (pre-filled with -1 for padding)
    kept_ptr,  # [E] out: rows kept per expert
    routed_ptr,  # [E] out: slots routed per expert
    S,
    T,
    D,
    E,
    capacity,
    num_blocks,
    stride_x,
    stride_out,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    # Slots routed to each expert by earlier blocks, and by all blocks. Each program re-reads the
    # small histogram table instead of waiting for a separate scan launch.
    before_E = tl.zeros([BLOCK_E], dtype=tl.int64)
    routed_E = tl.zeros([BLOCK_E], dtype=tl.int64)
    for b in range(0, num_blocks):
        h = tl.load(hist_ptr + b * BLOCK_E + experts)
        routed_E += h
        before_E += tl.where(b < pid, h, 0)
    kept_E = tl.minimum(routed_E, capacity)
    start_E = tl.cumsum(kept_E, axis=0) - kept_E
    if pid == 0:
        tl.store(kept_ptr + experts, kept_E, mask=experts < E)
        tl.store(routed_ptr + experts, routed_E, mask=experts < E)

    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = slots < S
    expert = tl.load(expert_ptr + slots, mask=in_range, other=-1)
    onehot = (expert[:, None] == experts[None, :]).to(tl.int64)
    # Rank of each slot among the slots of its expert: earlier blocks + earlier rows of this block.
    rank_SE = tl.cumsum(onehot, axis=0) - onehot + before_E[None, :]
    rank = tl.sum(rank_SE * onehot, axis=1)
    start = tl.sum(start_E[None, :] * onehot, axis=1)
    keep = in_range & (rank < capacity)
    row = tl.where(keep, start + rank, -1)
    tl.store(row_map_ptr + slots, row, mask=in_range)
    tl.store(src_ptr + row, slots.to(tl.int64), mask=keep)

    token = (slots % T).to(tl.int64)  # int64: token * stride can pass 2^31
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (cols < D)[None, :]
        v = tl.load(x_ptr + token[:, None] * stride_x + cols[None, :], mask=mask)
        tl.store(out_ptr + row[:, None] * stride_out + cols[None, :], v, mask=mask)


@triton.jit
def _combine_kernel(
    src_ptr,  # [R, D] grouped rows
    row_map_ptr,  # [S] grouped row of each slot, -1 if dropped
    weight_ptr,  # [T, K] gate weights (unused when HAS_WEIGHT is False)
    y_ptr,  # [T, D] out
    T,
    D,
    K,
    stride_src,
    stride_y,
    stride_wt,
    stride_wk,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = tokens < T
    d_mask = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in range(0, K):
        row = tl.load(row_map_ptr + k * T + tokens, mask=t_mask, other=-1)
        mask = (row >= 0)[:, None] & d_mask[None, :]
        v = tl.load(src_ptr + row[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
        v = v.to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + tokens * stride_wt + k * stride_wk, mask=t_mask, other=0.0)
            v = v * w.to(tl.float32)[:, None]
        acc += v
    out_mask = t_mask[:, None] & d_mask[None, :]
    tl.store(y_ptr + tokens[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_backward_kernel(
    grad_y_ptr,  # [T, D] gradient of the combined output
    src_ptr,  # [R, D] grouped rows that were combined
    row_map_ptr,  # [S]
    weight_ptr,  # [T, K]
    grad_src_ptr,  # [R, D] out: gradient of the grouped rows
    grad_w_ptr,  # [T, K] out (fp32): gradient of the gate weights
    S,
    T,
    D,
    stride_gy,
    stride_src,
    stride_gsrc,
    stride_wt,
    stride_wk,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    slots = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = slots < S
    row = tl.load(row_map_ptr + slots, mask=in_range, other=-1)
    valid = row >= 0
    token = (slots % T).to(tl.int64)
    k = slots // T
    w = tl.load(weight_ptr + token * stride_wt + k * stride_wk, mask=valid, other=0.0).to(tl.float32)
    dot = tl.zeros([BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = valid[:, None] & (cols < D)[None, :]
        gy = tl.load(grad_y_ptr + token[:, None] * stride_gy + cols[None, :], mask=mask, other=0.0)
        gy = gy.to(tl.float32)
        v = tl.load(src_ptr + row[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
        dot += tl.sum(gy * v.to(tl.float32), axis=1)
        g = (gy * w[:, None]).to(grad_src_ptr.dtype.element_ty)
        tl.store(grad_src_ptr + row[:, None] * stride_gsrc + cols[None, :], g, mask=mask)
    # grad_w is [T, K] contiguous; dropped slots get 0.
    tl.store(grad_w_ptr + token * (S // T) + k, dot, mask=in_range)


def _block_d(D: int) -> int:
    return max(min(triton.next_power_of_2(D), 128), 16)


def route_and_permute(x_TD: torch.Tensor, expert_TK: torch.Tensor, num_experts: int, capacity, num_rows: int):
    """Launch the routing kernels: ``(x_RD, row_map_S, src_R, kept_E, routed_E)``."""
    T, K = expert_TK.shape
    S = T * K
    D = x_TD.shape[1]
    expert_S = expert_TK.t().contiguous().view(-1)
    BLOCK_S = 128
    BLOCK_E = max(triton.next_power_of_2(num_experts), 16)
    num_blocks = triton.cdiv(S, BLOCK_S)
    dev = x_TD.device
    hist = torch.empty(num_blocks, BLOCK_E, dtype=torch.int64, device=dev)
    _histogram_kernel[(num_blocks,)](expert_S, hist, S, BLOCK_S=BLOCK_S, BLOCK_E=BLOCK_E)
    padded = num_rows > 0 and (capacity is not None and capacity < S)
    x_RD = (torch.zeros if padded else torch.empty)(num_rows, D, dtype=x_TD.dtype, device=dev)
    row_map_S = torch.empty(S, dtype=torch.int64, device=dev)
    src_R = torch.full((num_rows,), -1, dtype=torch.int64, device=dev)
    # zeros: with no slots at all no program runs to write them
    kept_E = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    routed_E = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    _route_scatter_kernel[(num_blocks,)](
        expert_S, hist, x_TD, x_RD, row_map_S, src_R, kept_E, routed_E,
        S, T, D, num_experts, S if capacity is None else capacity, num_blocks,
        x_TD.stride(0), x_RD.stride(0),
        BLOCK_S=BLOCK_S, BLOCK_E=BLOCK_E, BLOCK_D=_block_d(D),
    )  # fmt: skip
    return x_RD, row_map_S, src_R, kept_E, routed_E


def combine(src_RD: torch.Tensor, row_map_S: torch.Tensor, weight_TK: torch.Tensor | None, T: int):
    """y[t] = sum_k weight[t, k] * src[row_map[k*T + t]] (weight 1 when None)."""
    D = src_RD.shape[1]
    K = row_map_S.numel() // T
    y_TD = torch.empty(T, D, dtype=src_RD.dtype, device=src_RD.device)
    BLOCK_T, BLOCK_D = 32, _block_d(D)
    w = weight_TK if weight_TK is not None else y_TD  # placeholder pointer, never read
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    _combine_kernel[grid](
        src_RD, row_map_S, w, y_TD, T, D, K,
        src_RD.stride(0), y_TD.stride(0), w.stride(0), w.stride(1) if weight_TK is not None else 0,
        HAS_WEIGHT=weight_TK is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return y_TD


def combine_backward(grad_y_TD, src_RD, row_map_S, weight_TK, padded: bool):
    """Gradients of ``combine`` w.r.t. the grouped rows and the gate weights."""
    T, K = weight_TK.shape
    S = T * K
    D = src_RD.shape[1]
    # Padding rows are referenced by no slot, so nothing writes them: start from zeros.
    alloc = torch.zeros if padded else torch.empty
    grad_src_RD = alloc(src_RD.shape, dtype=src_RD.dtype, device=src_RD.device)
    grad_w_TK = torch.empty(T, K, dtype=torch.float32, device=src_RD.device)
    BLOCK_S = 32
    _combine_backward_kernel[(triton.cdiv(S, BLOCK_S),)](
        grad_y_TD, src_RD, row_map_S, weight_TK, grad_src_RD, grad_w_TK, S, T, D,
        grad_y_TD.stride(0), src_RD.stride(0), grad_src_RD.stride(0),
        weight_TK.stride(0), weight_TK.stride(1),
        BLOCK_S=BLOCK_S, BLOCK_D=_block_d(D),
    )  # fmt: skip
    return grad_src_RD, grad_w_TK.to(weight_TK.dtype)
