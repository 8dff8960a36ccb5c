"""Decoder-only MoE transformer, written for one device.

Expert parallelism, data parallelism and checkpoint sharding are applied from outside
(``moe_cluster.parallel``); nothing here knows about ranks.

Legend: B batch, S sequence, D model dim, V vocabulary, Hd head dim, N heads.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import DenseMLP, GroupedExperts, MoELayer
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BNSH: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + Hd/2]) by position-dependent angles (the GPT-NeoX/Llama layout)."""
    x1, x2 = x_BNSH.float().chunk(2, dim=-1)
    cos, sin = cos_SH[None, None], sin_SH[None, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x_BNSH)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads or config.n_heads
        self.head_dim = config.dim // config.n_heads
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        """``cache``: a ``generate.LayerKV`` when decoding (the new positions follow ``cache.start``
        cached ones); None in training."""
        B, S, D = x_BSD.shape
        Hd, N, Nkv = self.head_dim, self.n_heads, self.n_kv_heads
        start = 0 if cache is None else cache.start
        q, k, v = self.wqkv(x_BSD).split([N * Hd, Nkv * Hd, Nkv * Hd], dim=-1)
        q = q.view(B, S, N, Hd).transpose(1, 2)
        k = k.view(B, S, Nkv, Hd).transpose(1, 2)
        v = v.view(B, S, Nkv, Hd).transpose(1, 2)
        cos, sin = cos[start : start + S], sin[start : start + S]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # now every position so far: [B, Nkv, start + S, Hd]
        if Nkv != N:  # grouped-query attention: each key/value head serves N / Nkv query heads
            k, v = k.repeat_interleave(N // Nkv, dim=1), v.repeat_interleave(N // Nkv, dim=1)
        # With nothing cached the mask is the plain causal one; one new token sees every cached
        # position; a chunk after cached positions needs the causal mask shifted by ``start``.
        mask = None
        if start and S > 1:
            mask = torch.ones(S, start + S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out_BNSH = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0)
        return self.wo(out_BNSH.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        m = config.moe
        if moe:
            self.ffn = MoELayer(
                config.dim, m.hidden_dim, m.num_experts, m.top_k,
                activation=m.activation, router=m.router, capacity_factor=m.capacity_factor,
                shared_experts=m.shared_experts, normalize_weights=m.normalize_weights,
                aux_loss_coef=m.aux_loss_coef, z_loss_coef=m.z_loss_coef, expert_bias=m.expert_bias,
                backend=m.backend, balance_scope=m.balance_scope,
            )  # fmt: skip
        else:
            self.ffn = DenseMLP(config.dim, config.dense_hidden_dim, m.activation)
        # Set from outside (moe_cluster.parallel.apply_activation_checkpointing): the block's body
        # runs as ``checkpoint_fn(body, x, cos, sin)``, e.g. under torch.utils.checkpoint.
        self.checkpoint_fn = None

    def forward(self, x_BSD, cos, sin, cache=None):
        if cache is not None:  # decoding: no backward, so nothing to checkpoint
            return self._body(x_BSD, cos, sin, cache)
        if self.checkpoint_fn is not None:
            return self.checkpoint_fn(self._body, x_BSD, cos, sin)
        return self._body(x_BSD, cos, sin)

    def _body(self, x_BSD, cos, sin, cache=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, cache)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class Transformer(nn.Module):
    """``model(tokens[B, S]) -> logits[B, S, V]``; ``model.aux_loss()`` after a forward pass."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(i)) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.embed.weight.is_meta:  # built on the meta device: the caller shards, then inits
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, experts: range | None = None) -> None:
        """Initialise parameters and buffers; the values do not depend on how experts are sharded.

        Every tensor draws from its own generator, seeded by ``seed`` and the tensor's name, and
        every expert of a stacked expert tensor from one seeded by its global index too. So a
        model whose stacked expert tensors hold only ``experts`` (one rank's slice, after
        ``apply_expert_parallel`` on a meta-device model and ``to_empty``) gets exactly that
        slice of the unsharded model's values, and no rank ever materialises the whole model.
        ``seed`` None draws one from torch's global generator.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight  # to_empty materialises the two names apart
        std = self.config.init_std
        # Output projections are scaled down with depth (GPT-2): keeps the residual stream's
        # variance flat at init.
        out_std = std / math.sqrt(2 * self.config.n_layers)
        stacked = {
            f"{m}.{n}" for m, mod in self.named_modules() if isinstance(mod, GroupedExperts) for n in ("w_up", "w_down")
        }
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            s = out_std if name.endswith(("wo.weight", "w_down", "down.weight")) else std
            if name in stacked:
                for i, e in enumerate(experts if experts is not None else range(p.shape[0])):
                    p[i].copy_(_normal(p.shape[1:], s, seed, f"{name}.e{e}"))
            else:
                p.copy_(_normal(p.shape, s, seed, name))
        cos, sin = rope_tables(self.config.dim // self.config.n_heads, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for layer in self.moe_layers():
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.zero_()

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, tokens_BS: torch.Tensor, cache=None) -> torch.Tensor:
        """``cache``: a ``generate.KVCache`` to read and extend (decoding); None in training."""
        start = 0 if cache is None else cache.length
        if start + tokens_BS.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {start + tokens_BS.shape[1]} exceeds model.max_seq_len={self.config.max_seq_len}"
            )
        x_BSD = self.embed(tokens_BS)
        for i, block in enumerate(self.blocks):
            if cache is None:  # training: the call FSDP's and checkpointing's hooks see, unchanged
                x_BSD = block(x_BSD, self.rope_cos, self.rope_sin)
            else:
                x_BSD = block(x_BSD, self.rope_cos, self.rope_sin, cache.layer(i))
        if cache is not None:
            cache.length += tokens_BS.shape[1]
        return self.head(self.norm(x_BSD))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' weighted auxiliary losses from the last forward pass."""
        losses = [layer.aux_loss for layer in self.moe_layers() if layer.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def pop_aux_loss(self) -> torch.Tensor:
        """``aux_loss()``, and the layers let go of theirs: the training step takes it this way.

        A loss left on a layer keeps its forward's autograd graph alive, and under FSDP that graph's
        backward hooks hold the layers in turn: a cycle through C++ that Python's collector cannot
        see. After a failed step it kept the whole model, and with it the process groups' sockets,
        alive, so that peers blocked in a collective with this rank waited for the group's timeout.
        """
        loss = self.aux_loss()
        for layer in self.moe_layers():
            layer.aux_loss = None
        return loss


def _normal(shape, std: float, seed: int, key: str) -> torch.Tensor:
    """N(0, std^2) values from a generator of their own (on CPU: the same on every device)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=g)


def num_params(config: ModelConfig, active: bool) -> int:
    """Parameters of the model (``active``: those one token uses: top-k experts, not all)."""
    D, m = config.dim, config.moe
    up = 2 if m.activation == "swiglu" else 1
    kv_dim = (config.n_kv_heads or config.n_heads) * (D // config.n_heads)
    attn = 2 * D * D + 2 * D * kv_dim
    dense_ffn = (up + 1) * D * config.dense_hidden_dim
    expert = (up + 1) * D * m.hidden_dim
    experts_used = m.top_k if active else m.num_experts
    moe_ffn = experts_used * expert + m.shared_experts * expert + D * m.num_experts
    n_moe = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    blocks = config.n_layers * (attn + 2 * D) + n_moe * moe_ffn + (config.n_layers - n_moe) * dense_ffn
    embed = config.vocab_size * D * (1 if config.tie_embeddings else 2)
    return blocks + embed + D


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * active matmul params + attention.

    The attention term is 12 * layers * dim * seq_len (scores and values, forward and backward,
    without the causal-mask saving), as in the PaLM appendix. The embedding lookup is not a
    matmul and is left out; the LM head is in.
    """
    matmul_params = num_params(config, active=True) - config.vocab_size * config.dim  # lookup is free
    if config.tie_embeddings:
        matmul_params += config.vocab_size * config.dim  # the tied head still multiplies
    return 6 * matmul_params + 12 * config.n_layers * config.dim * seq_len
