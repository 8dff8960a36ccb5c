"""Autoregressive decoding with a KV cache: one forward over the prompt, then one token at a time.

``Transformer.forward(tokens, cache=KVCache(...))`` reads and extends the cache; without a cache
(training) the forward is the plain causal one. Draws are made on the CPU with the caller's
``torch.Generator``: the same seed and logits give the same tokens on any device.

Legend: B batch, N key/value heads, S positions, H head dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .config import ModelConfig


class LayerKV:
    """One layer's view of the cache for one forward: positions [0, start) are filled."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer, self.start = cache, layer, cache.length

    def update(self, k_BNSH: torch.Tensor, v_BNSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; returns those of positions [0, start + S)."""
        k_all, v_all = self.cache.buffers(self.layer, k_BNSH)
        end = self.start + k_BNSH.shape[2]
        k_all[:, :, self.start : end] = k_BNSH
        v_all[:, :, self.start : end] = v_BNSH
        return k_all[:, :, :end], v_all[:, :, :end]


class KVCache:
    """Keys and values (after RoPE, before GQA's repeat) of every layer, preallocated to max_seq_len.

    ``length`` positions are filled; ``Transformer.forward`` advances it after all layers ran.
    The buffers take the dtype and device of the first keys stored (bf16 under CUDA autocast).
    """

    def __init__(self, config: ModelConfig, batch: int = 1):
        self.max_len = config.max_seq_len
        self.batch, self.n_kv = batch, config.n_kv_heads or config.n_heads
        self.head_dim = config.dim // config.n_heads
        self.k = [None] * config.n_layers
        self.v = [None] * config.n_layers
        self.length = 0

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self, i)

    def buffers(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is None:
            shape = (self.batch, self.n_kv, self.max_len, self.head_dim)
            self.k[i] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[i] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[i], self.v[i]


def next_token(logits_V: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """Greedy (``temperature`` 0: the first of the largest logits, as transformers' argmax) or a
    draw from softmax(logits / temperature) over the ``top_k`` largest."""
    if not bool(torch.isfinite(logits_V).all()):  # a draw would fail inside torch, an argmax pick garbage
        raise ValueError(
            "the model's logits are not finite (NaN or infinity): its weights overflow on this input; the checkpoint "
            "is unusable for sampling (try an earlier one)"
        )
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.detach().float().cpu() / temperature
    if top_k is not None and top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits_V, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The tokens after ``prompt`` (ids), ``stop_id`` included when it ends the text.

    ``prompt`` plus the new tokens must fit in ``model.config.max_seq_len``: the caller decides
    how many to ask for. ``on_token(id)`` is called as each token is chosen (streaming).
    """
    cfg = model.config
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token to condition on")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"{len(prompt)} prompt tokens + {max_new_tokens} new ones exceed model.max_seq_len={cfg.max_seq_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    cache = KVCache(cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    out: list[int] = []
    with autocast:
        logits_BSV = model(torch.tensor([list(prompt)], device=device), cache=cache)
        for i in range(max_new_tokens):
            token = next_token(logits_BSV[0, -1], temperature, top_k, generator)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token == stop_id or i == max_new_tokens - 1:
                break  # the last token needs no forward of its own
            logits_BSV = model(torch.tensor([[token]], device=device), cache=cache)
    return out
