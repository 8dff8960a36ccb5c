"""Hugging Face Mixtral format: export checkpoints to it, start training from it.

The files are the classic Mixtral layout (``config.json`` + ``model.safetensors`` with
``block_sparse_moe.experts.{e}.w1/w2/w3``), which transformers, vLLM and friends load. Only
checkpoints whose architecture Mixtral can express convert: softmax top-k router with
renormalised weights, SwiGLU experts in every block, no shared experts, no expert bias, dropless.
transformers is not needed for either direction (safetensors is).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..model import ModelConfig, MoEConfig, Transformer

PREFIX = "hf:"


def check_expressible(cfg: ModelConfig) -> None:
    """Raise a ValueError naming the first feature Mixtral cannot express."""
    m = cfg.moe
    problems = [
        (m.router != "softmax", f"model.moe.router={m.router!r} (Mixtral routes with softmax)"),
        (m.normalize_weights is False or (m.normalize_weights is None and m.top_k == 1),
         "un-normalised top-k weights (Mixtral renormalises them)"),
        (m.activation != "swiglu", f"model.moe.activation={m.activation!r} (Mixtral experts are SwiGLU)"),
        (m.shared_experts > 0, f"model.moe.shared_experts={m.shared_experts} (Mixtral has none)"),
        (m.expert_bias, "model.moe.expert_bias=true (Mixtral has no routing bias)"),
        (m.capacity_factor is not None, f"model.moe.capacity_factor={m.capacity_factor} (Mixtral is dropless)"),
        (cfg.moe_every != 1 or cfg.first_dense_layers != 0, "dense feed-forward blocks (Mixtral has MoE in every block)"),
    ]  # fmt: skip
    for bad, what in problems:
        if bad:
            raise ValueError(f"this checkpoint cannot be written as Mixtral: {what}")


def hf_config(cfg: ModelConfig) -> dict:
    m = cfg.moe
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": m.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_coef,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "sliding_window": None,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }


def model_config_from_hf(config: dict, base: ModelConfig | None = None) -> ModelConfig:
    """Our ModelConfig for a Mixtral config.json; training knobs (loss weights, backend) from ``base``."""
    if config.get("model_type") != "mixtral":
        raise ValueError(f"model_type is {config.get('model_type')!r}; only Mixtral-format directories import")
    base = base or ModelConfig()
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e6)
    head_dim = config.get("head_dim")
    if head_dim not in (None, config["hidden_size"] // config["num_attention_heads"]):
        raise ValueError(f"head_dim={head_dim} differs from hidden_size / num_attention_heads; not supported")
    moe = dataclasses.replace(
        base.moe, num_experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
        hidden_dim=config["intermediate_size"], activation="swiglu", router="softmax", capacity_factor=None,
        shared_experts=0, normalize_weights=True, expert_bias=False,
    )  # fmt: skip
    return dataclasses.replace(
        base, vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
        max_seq_len=config["max_position_embeddings"], rope_theta=float(rope), norm_eps=config["rms_norm_eps"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), moe_every=1, first_dense_layers=0, moe=moe,
    )  # fmt: skip


def _hf_dir(init_from: str) -> Path:
    if not init_from.startswith(PREFIX):
        raise ValueError(f"model.init_from={init_from!r} is not understood; use hf:/path/to/mixtral-dir")
    path = Path(init_from[len(PREFIX) :])
    if not (path / "config.json").is_file():
        raise ValueError(f"model.init_from: {path} has no config.json (a Mixtral-format directory is expected)")
    return path


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """With ``init_from=hf:PATH``, the architecture comes from PATH/config.json."""
    if not cfg.init_from:
        return cfg
    path = _hf_dir(cfg.init_from)
    return model_config_from_hf(json.loads((path / "config.json").read_text()), cfg)


# -- weights ------------------------------------------------------------------------------------


def to_hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full (unsharded) model state, experts as stacked [E, ...] tensors -> Mixtral keys."""
    Hd = cfg.dim // cfg.n_heads
    N, Nkv, H = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.moe.hidden_dim
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[b + "attn.wqkv.weight"].split([N * Hd, Nkv * Hd, Nkv * Hd])
        out.update({
            h + "input_layernorm.weight": state[b + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": state[b + "attn.wo.weight"],
            h + "post_attention_layernorm.weight": state[b + "ffn_norm.weight"],
            h + "block_sparse_moe.gate.weight": state[b + "ffn.router.weight"],
        })  # fmt: skip
        w_up, w_down = state[b + "ffn.experts.w_up"], state[b + "ffn.experts.w_down"]
        for e in range(cfg.moe.num_experts):
            x = f"{h}block_sparse_moe.experts.{e}."
            out[x + "w1.weight"] = w_up[e, :, :H].t()  # gate
            out[x + "w3.weight"] = w_up[e, :, H:].t()  # up
            out[x + "w2.weight"] = w_down[e].t()  # down
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(cfg: ModelConfig, hf: Mapping[str, torch.Tensor], experts: range | None = None) -> dict[str, torch.Tensor]:
    """Mixtral keys -> our model state, stacking the ``experts`` given (default: all).

    Only the tensors needed are read from ``hf`` (which may be lazy: ``SafetensorsDir``).
    """
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    out["head.weight"] = hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[b + "attn_norm.weight"] = hf[h + "input_layernorm.weight"]
        out[b + "attn.wqkv.weight"] = torch.cat([hf[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[b + "attn.wo.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[b + "ffn_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[b + "ffn.router.weight"] = hf[h + "block_sparse_moe.gate.weight"]
        x = h + "block_sparse_moe.experts.{}."
        local = experts if experts is not None else range(cfg.moe.num_experts)
        out[b + "ffn.experts.w_up"] = torch.stack(
            [torch.cat([hf[x.format(e) + "w1.weight"].t(), hf[x.format(e) + "w3.weight"].t()], dim=1) for e in local]
        )
        out[b + "ffn.experts.w_down"] = torch.stack([hf[x.format(e) + "w2.weight"].t() for e in local])
    return out


class SafetensorsDir(Mapping):
    """The tensors of a folder's ``*.safetensors`` files, each read from disk when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model.init_from: no .safetensors files in {path}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_hf_weights(model: Transformer, init_from: str, experts: range | None = None) -> None:
    """Copy a Mixtral-format directory's weights into the model (in place).

    ``experts``: the global experts the model's stacked expert tensors hold (one rank's slice
    under expert parallelism); None: all of them.
    """
    path = _hf_dir(init_from)
    try:
        # Each rank reads the dense weights and its own experts only.
        state = from_hf_state(model.config, SafetensorsDir(path), experts)
    except KeyError as exc:
        raise ValueError(f"{path}: the weights lack {exc}, which config.json's architecture needs") from None
    missing = model.load_state_dict(state, strict=False)
    unexpected = [k for k in missing.missing_keys if not k.endswith("expert_bias")]
    if unexpected or missing.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model (missing {unexpected}, extra {missing.unexpected_keys})")


# -- export ---------------------------------------------------------------------------------------

_EXPERT_KEY = re.compile(r"^(.*experts\.w_(?:up|down))\.e(\d+)$")


def read_checkpoint(checkpoint_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A DCP checkpoint (written at any EP size) as (model config, full model state)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ..train.checkpoint import MARKER

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / MARKER).is_file():
        raise ValueError(f"{checkpoint_dir} is not a complete checkpoint (no {MARKER} marker)")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(checkpoint_dir), f"{tmp}/full.pt")
        full = torch.load(f"{tmp}/full.pt", weights_only=False)
    extra = full["extra"]
    if "model_config" not in extra:
        raise ValueError(f"{checkpoint_dir} has no model configuration (written by an older version)")
    raw = json.loads(extra["model_config"])
    cfg = ModelConfig(**{**raw, "moe": MoEConfig(**raw["moe"])})
    experts: dict[str, dict[int, torch.Tensor]] = {}
    state = {}
    for key, value in full["model"].items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(m.group(1), {})[int(m.group(2))] = value
        else:
            state[key] = value
    for name, by_index in experts.items():
        state[name] = torch.stack([by_index[e] for e in range(len(by_index))])
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return cfg, state


def export_hf_mixtral(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (fp32) for a checkpoint."""
    from safetensors.torch import save_file

    cfg, state = read_checkpoint(checkpoint_dir)
    check_expressible(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(cfg, state), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    return out_dir
