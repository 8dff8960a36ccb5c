"""Triton grouped GEMM: one matrix per expert over contiguous groups of rows.

Forward ``y[rows of e] = x[rows of e] @ w[e]`` and the input gradient ``dx = dy @ w[e].T``
share ``_grouped_mm_kernel`` (the transpose is a swap of strides). The weight gradient
``dw[e] = x[rows of e].T @ dy[rows of e]`` is ``_grouped_mm_wgrad_kernel``: one program per
(expert, output tile) walks its expert's rows.

The tile schedule is computed inside the kernel from the per-expert row counts, so the host
never reads the counts back (no device sync): a program finds its expert by counting the
experts whose tiles end at or before its own tile index. The grid is sized for the worst case,
``cdiv(R, BLOCK_M) + E`` row tiles; programs past the last tile return at once.

Legend: R grouped rows, E experts, K reduction size, N output features.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(interpreter: tuple, gpu: list[tuple]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) rows.

    Under the CPU interpreter only the one small ``interpreter`` config runs: it keeps tests quick
    and exercises the masks with test shapes that are not multiples of the block sizes.
    """
    rows = [interpreter] if _interpreting() else gpu
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in rows
    ]


def grouped_mm_configs() -> list[triton.Config]:
    """Tile shapes tried by the autotuner for the forward and input-gradient GEMMs."""
    return _configs(
        (32, 32, 16, 4, 1),
        [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
    )


def grouped_mm_wgrad_configs() -> list[triton.Config]:
    """Tile shapes for the weight gradient (output tile BLOCK_K x BLOCK_N, reduction BLOCK_M)."""
    return _configs(
        (16, 32, 32, 4, 1),
        [(64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (32, 128, 128, 4, 4), (64, 128, 64, 4, 4)],
    )


@triton.jit
def _expert_of_tile(counts_ptr, tile, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row of the tile, end row of the expert's group) for a row-tile index."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= tile).to(tl.int32))
    before = experts < expert
    group_start = tl.sum(tl.where(before, counts, 0))
    first_tile = tl.sum(tl.where(before, tiles, 0))
    group_end = group_start + tl.sum(tl.where(experts == expert, counts, 0))
    return expert, group_start + (tile - first_tile) * BLOCK_M, group_end


@triton.autotune(configs=grouped_mm_configs(), key=["N", "K", "TRANS_W"])
@triton.jit
def _grouped_mm_kernel(
    x_ptr,  # [R, K]
    w_ptr,  # [E, K, N] (or [E, N, K] read transposed when TRANS_W)
    y_ptr,  # [R, N] out
    counts_ptr,  # [E] rows per expert; groups are contiguous, in expert order
    N,
    K,
    E,
    stride_xr,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_yr,
    stride_yn,
    TRANS_W: tl.constexpr,  # only part of the autotune key: strides already encode the transpose
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # CPU interpreter only: its bf16 tl.dot is wrong, so feed it fp32
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert, row0, row_end = _expert_of_tile(counts_ptr, tl.program_id(0), E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < row_end
    n_mask = cols < N
    x_base = x_ptr + rows[:, None].to(tl.int64) * stride_xr
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_base + ks[None, :] * stride_xk, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_base + ks[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
    y = y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=grouped_mm_wgrad_configs(), key=["N", "K"])
@triton.jit
def _grouped_mm_wgrad_kernel(
    x_ptr,  # [R, K]
    dy_ptr,  # [R, N]
    dw_ptr,  # [E, K, N] out
    counts_ptr,  # [E]
    N,
    K,
    E,
    stride_xr,
    stride_xk,
    stride_dyr,
    stride_dyn,
    stride_dwe,
    stride_dwk,
    stride_dwn,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # CPU interpreter only: its bf16 tl.dot is wrong, so feed it fp32
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_k = tl.program_id(1) // tiles_n
    pid_n = tl.program_id(1) % tiles_n
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    group_start = tl.sum(tl.where(experts < expert, counts, 0))
    count = tl.sum(tl.where(experts == expert, counts, 0))

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    n_mask = cols < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    # An expert with no rows leaves acc at zero: its weight gradient is written as zeros.
    for m0 in range(0, count, BLOCK_M):
        offs = m0 + tl.arange(0, BLOCK_M)
        rows = (group_start + offs).to(tl.int64)
        r_mask = offs < count
        a = tl.load(x_ptr + rows[None, :] * stride_xr + ks[:, None] * stride_xk, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :] * stride_dyn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
    dw = dw_ptr + expert.to(tl.int64) * stride_dwe + ks[:, None] * stride_dwk + cols[None, :] * stride_dwn
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay true fp32 (no TF32 rounding), so fp32 results match the references closely.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_e(E: int) -> int:
    return max(triton.next_power_of_2(E), 16)


def grouped_mm(x_RK, w_EKN, counts_E, trans_w: bool = False, padded: bool = True):
    """y[rows of e] = x[rows of e] @ w[e] (w[e].T when trans_w); rows past the groups are zero.

    ``padded=False`` promises that the groups cover all R rows, which skips zero-filling.
    """
    R, K = x_RK.shape
    E = w_EKN.shape[0]
    N = w_EKN.shape[1] if trans_w else w_EKN.shape[2]
    # Rows past the last group are written by no program; zero them so the output is defined.
    alloc = torch.zeros if padded else torch.empty
    y_RN = alloc(R, N, dtype=x_RK.dtype, device=x_RK.device)
    stride_wk, stride_wn = (w_EKN.stride(2), w_EKN.stride(1)) if trans_w else (w_EKN.stride(1), w_EKN.stride(2))

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_M"]) + E, triton.cdiv(N, meta["BLOCK_N"]))

    _grouped_mm_kernel[grid](
        x_RK, w_EKN, y_RN, counts_E, N, K, E,
        x_RK.stride(0), x_RK.stride(1), w_EKN.stride(0), stride_wk, stride_wn, y_RN.stride(0), y_RN.stride(1),
        TRANS_W=trans_w, INPUT_PRECISION=_precision(x_RK.dtype), UPCAST=_interpreting(), BLOCK_E=_block_e(E),
    )  # fmt: skip
    return y_RN


def grouped_mm_weight_grad(x_RK: torch.Tensor, dy_RN: torch.Tensor, counts_E: torch.Tensor):
    """dw[e] = x[rows of e].T @ dy[rows of e], shape [E, K, N]."""
    K = x_RK.shape[1]
    N = dy_RN.shape[1]
    E = counts_E.numel()
    dw_EKN = torch.empty(E, K, N, dtype=x_RK.dtype, device=x_RK.device)

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]))

    _grouped_mm_wgrad_kernel[grid](
        x_RK, dy_RN, dw_EKN, counts_E, N, K, E,
        x_RK.stride(0), x_RK.stride(1), dy_RN.stride(0), dy_RN.stride(1),
        dw_EKN.stride(0), dw_EKN.stride(1), dw_EKN.stride(2),
        INPUT_PRECISION=_precision(x_RK.dtype), UPCAST=_interpreting(), BLOCK_E=_block_e(E),
    )  # fmt: skip
    return dw_EKN
