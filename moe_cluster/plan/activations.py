"""Activation memory for the planner: the bytes autograd keeps from one micro-batch's forward.

Counted op by op from the model's code (model/transformer.py, moe/layer.py, moe/router.py,
moe/dispatch.py, kernels/): which tensors each op saves for its backward, in which dtype. Views
share their base's storage, so a tensor saved through a view counts once. Checked against the
bytes measured on CPU (tests/test_plan.py, docs/scaling.md).

What each part keeps, per token of the micro-batch (SwiGLU; GELU keeps less in the MLPs):

- RMSNorm: its input in fp32 (a copy when the stream is bf16), the normalised x, and its output
  (saved by the next matmul, in the compute dtype).
- attention: q/k/v (v is a view of the fused projection, so all of it stays), q and k after RoPE
  (with grouped-query attention: k and v repeated to every head instead), SDPA's output and
  log-sum-exp, and the output projection's input.
- router (fp32 always): logits, probabilities, the chosen experts and their weights.
- routed experts, per row a rank computes: the up-projection's output and the activation (the
  Triton path also keeps its input rows and SiLU's output); with EP, the rows received and the
  permutations; per (token, slot): the combine's inputs.
- outside the blocks: token ids, the final norm, the logits, and the log-softmax the
  cross-entropy keeps (fp32; on GPU also the bf16 logits).

Legend: T tokens on this rank, R expert rows on this rank, D dim, Dkv key/value width, N heads,
E experts, K top-k, H expert hidden dim, U = 2H (SwiGLU) or H (GELU), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..model import ModelConfig

I64 = 8  # token ids, expert choices, permutations


@dataclass(frozen=True)
class Precision:
    act: int  # bytes per element of the compute dtype: bf16 on GPU (autocast), fp32 on CPU
    stream: int  # of the residual stream, the parameters' dtype: fp32, or bf16 under FSDP's mixed precision

    @classmethod
    def of(cls, gpu: bool, fsdp: bool) -> Precision:
        if not gpu:
            return cls(act=4, stream=4)
        return cls(act=2, stream=2 if fsdp else 4)


def _norm(T: int, D: int, pr: Precision, output: bool) -> int:
    """RMSNorm: fp32 input, normalised x, a [T, 1] rsqrt; ``output``: also the output (the next matmul's input)."""
    return T * D * (4 + pr.stream + (pr.act if output else 0)) + 4 * T


def _mlp(T: int, hidden: int, swiglu: bool, pr: Precision) -> int:
    """A dense MLP (shared experts, dense blocks), input not counted: up-projection output,
    SiLU's output and the product (SwiGLU), or the GELU input and output."""
    return T * hidden * (4 if swiglu else 2) * pr.act


def expert_rows(m: ModelConfig, T: int, ep: int, load_imbalance: float) -> tuple[int, int]:
    """(slots kept on the sending side, rows this rank's experts compute).

    Dropless, every (token, slot) is a row: T*K. With capacity, at most E*capacity rows (the
    padding included). With EP each rank's experts get T*K rows on average, ``load_imbalance``
    times that allowed for (at most ep times: every row of the group).
    """
    x = m.moe
    slots = T * x.top_k
    cap = math.ceil(x.capacity_factor * T * x.top_k / x.num_experts) if x.capacity_factor is not None else None
    kept = slots if cap is None else min(slots, x.num_experts * cap)
    if ep == 1:
        return kept, kept
    rows = math.ceil(slots * min(load_imbalance, ep))
    return kept, rows if cap is None else min(rows, x.num_experts * cap)


def _attention(m: ModelConfig, T: int, pr: Precision) -> int:
    D, N = m.dim, m.n_heads
    Nkv = m.n_kv_heads or N
    Dkv = Nkv * (D // N)
    if Nkv == N:
        qkv = T * (D + 2 * Dkv + D + Dkv) * pr.act  # the fused projection, q and k after RoPE
    else:
        qkv = T * 3 * D * pr.act  # q after RoPE, k and v repeated: the projection itself is not kept
    return _norm(T, D, pr, output=True) + qkv + T * D * pr.act + 4 * T * N + T * D * pr.act


def _moe_ffn(m: ModelConfig, T: int, ep: int, pr: Precision, eager: bool, load_imbalance: float) -> dict[str, int]:
    x, D, act = m.moe, m.dim, pr.act
    E, K, H = x.num_experts, x.top_k, x.hidden_dim
    swiglu = x.activation == "swiglu"
    U = 2 * H if swiglu else H
    kept, R = expert_rows(m, T, ep, load_imbalance)
    # The norm's output is the router's input, in fp32 (the router runs in fp32).
    out = {"norm": _norm(T, D, pr, output=False) + 4 * T * D}
    if act != 4 and (x.shared_experts or (eager and ep == 1)):
        out["norm"] += T * D * act  # the bf16 copy the shared experts / the fused eager path keep
    out["router"] = T * (2 * E * 4 + K * I64 + K * 4 + 3 * 4)
    if eager and ep == 1:
        # One fused op: gate and token index per row, then the up-projection and activation chunks.
        out["routed experts"] = kept * (act + 2 * I64) + R * (U + H) * act
    elif eager:
        # Rows mode: combine keeps the returned rows and the indices; each received row keeps its
        # input, two permutation indices, the up-projection and the activation.
        out["routed experts"] = kept * (D * act + 2 * I64) + T * K * act + R * (D * act + 2 * I64 + (U + H) * act)
    else:
        # Triton: the grouped GEMMs keep their inputs (rows, activation), SwiGLU its SiLU output.
        hidden = U + H + (H if swiglu else 0)
        perms = 2 * I64 if ep > 1 else 0
        out["routed experts"] = kept * (D * act + 2 * I64) + T * K * act + R * (D * act + hidden * act + perms)
    if x.shared_experts:
        out["shared experts"] = _mlp(T, x.shared_experts * H, swiglu, pr)
    return out


def _selective_moe(m: ModelConfig, T: int, ep: int, pr: Precision, eager: bool, load_imbalance: float) -> int:
    """What selective checkpointing keeps of an MoE feed-forward: the outputs of its matmuls and
    collectives (moe_cluster/parallel/checkpointing.py's op list)."""
    x, D, act = m.moe, m.dim, pr.act
    U = 2 * x.hidden_dim if x.activation == "swiglu" else x.hidden_dim
    kept, R = expert_rows(m, T, ep, load_imbalance)
    out = T * x.num_experts * 4  # router logits
    if eager:
        # The expert GEMMs are aten matmuls: the up- and down-projections' outputs. (Rows mode, EP
        # > 1, writes the down-projection into its output with mm's out=, not kept, except where
        # the GEMM goes through oneDNN (large fp32 ones): counted always, an upper bound.)
        out += R * (U + D) * act
    # (Triton's grouped GEMMs are kernel launches, not aten ops: recomputed.)
    if ep > 1:
        out += (R + kept) * D * act  # the two all-to-alls' outputs
    if x.shared_experts:
        Hs = x.shared_experts * x.hidden_dim
        out += T * ((2 * Hs if x.activation == "swiglu" else Hs) + D) * act
    return out


def activation_bytes(
    m: ModelConfig, T: int, ep: int, mode: str, pr: Precision, *, load_imbalance: float, eager: bool
) -> dict[str, int]:
    """What one rank keeps for the backward of a micro-batch of ``T`` tokens, at its peak.

    Returns ``{"peak": bytes, <part>: bytes, ...}`` (the parts sum to the peak). ``mode`` is
    ``model.activation_checkpointing``; ``eager``: the eager expert path (CPU, or backend=torch).
    With checkpointing the peak comes in the backward, when one block runs again whole while
    the others' kept tensors wait.
    """
    D, V = m.dim, m.vocab_size
    moe = [i for i in range(m.n_layers) if m.is_moe_layer(i)]
    n_dense = m.n_layers - len(moe)
    attention = _attention(m, T, pr)
    ffn = _moe_ffn(m, T, ep, pr, eager, load_imbalance) if moe else {}
    swiglu = m.moe.activation == "swiglu"
    dense_ffn = _norm(T, D, pr, output=True) + _mlp(T, m.dense_hidden_dim, swiglu, pr)
    logits = T * V * (pr.act + (4 if pr.act != 4 else 0) + 4)  # logits (+ their fp32 copy), log-softmax
    outside = 2 * T * I64 + _norm(T, D, pr, output=True) + logits  # token ids and targets, final norm
    block_none = max(attention + sum(ffn.values()) if moe else 0, attention + dense_ffn if n_dense else 0)
    if mode == "none":
        parts = {f"attention x {m.n_layers} blocks": m.n_layers * attention}
        for name, n in ffn.items():
            parts[f"MoE {name} x {len(moe)} layers"] = len(moe) * n
        if n_dense:
            parts[f"dense feed-forward x {n_dense} blocks"] = n_dense * dense_ffn
        parts["embedding, final norm, logits and cross-entropy"] = outside
        return {"peak": sum(parts.values()), **parts}
    block_input = T * D * pr.stream
    if mode == "full":
        kept = {f"block inputs x {m.n_layers} (full checkpointing)": m.n_layers * block_input}
    else:
        Nkv = m.n_kv_heads or m.n_heads
        attn = T * (2 * D + 2 * Nkv * (D // m.n_heads)) * pr.act + T * (D * pr.act + 4 * m.n_heads)  # qkv, wo, SDPA
        kept = {f"block inputs, attention matmul outputs x {m.n_layers} (selective)": m.n_layers * (block_input + attn)}
        if moe:
            kept[f"MoE matmul and all-to-all outputs x {len(moe)} (selective)"] = len(moe) * _selective_moe(
                m, T, ep, pr, eager, load_imbalance
            )
        if n_dense:
            up = (2 if swiglu else 1) * m.dense_hidden_dim
            kept[f"dense feed-forward matmul outputs x {n_dense} (selective)"] = n_dense * T * (up + D) * pr.act
    kept["embedding, final norm, logits and cross-entropy"] = outside
    at_forward_end = sum(kept.values())
    # In the backward the logits are gone by the time a block is recomputed.
    in_backward = at_forward_end - logits + block_none
    kept["one block recomputed in the backward"] = max(0, in_backward - at_forward_end)
    return {"peak": max(at_forward_end, in_backward), **kept}
