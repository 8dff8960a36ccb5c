"""Hugging Face Mixtral format: export checkpoints to it, start training from it.

The files are the classic Mixtral layout (``config.json`` + ``model.safetensors``, or shards and
``model.safetensors.index.json``, with ``block_sparse_moe.experts.{e}.w1/w2/w3``), which
transformers, vLLM and friends load. Only checkpoints whose architecture Mixtral can express
convert: softmax top-k router with renormalised weights, SwiGLU experts in every block, no shared
experts, no expert bias, dropless.
transformers is not needed for either direction (safetensors is).

An export also carries the run's tokenizer: the checkpoint's ``tokenizer.json`` (a BPE run's, or
the byte-level equivalent of the bytes tokenizer; train/run_info.py) with a
``tokenizer_config.json``, and config.json's ``eos_token_id`` is the run's end-of-document id.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..model import ModelConfig, MoEConfig, Transformer
from ..outdir import check_output_dir, clear_output_dir

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


def hf_config(cfg: ModelConfig, torch_dtype: str = "float32", eos_id: int | None = None) -> dict:
    """``eos_id``: the run's end-of-document token, where generation stops (None: nowhere)."""
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
        "torch_dtype": torch_dtype,
        # Explicit: Mixtral's defaults (BOS 1, EOS 2) are another tokenizer's, and generate()
        # would stop at token 2. Training never prepends a BOS.
        "bos_token_id": None,
        "eos_token_id": eos_id,
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


def weights_loader(init_from: str):
    """``Trainer(init_weights=...)`` for ``model.init_from=hf:PATH``: each rank reads its own experts."""

    def load(model: Transformer, experts: range) -> None:
        load_hf_weights(model, init_from, experts=experts)

    return load


# -- export ---------------------------------------------------------------------------------------
#
# Streamed: the commit marker gives the model config (checked before anything else is read) and
# DCP's metadata every tensor's shape, so the shards are planned before any weight is read. Then
# each shard's tensors are read one checkpoint tensor at a time (model tensors only, never the
# optimizer's moments), converted, written and freed: peak memory is about one shard.

_EXPERT_KEY = re.compile(r"^(.*experts\.w_(?:up|down))\.e(\d+)$")  # one key per global expert
DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}


def parse_size(size: int | str) -> int:
    """Bytes in a size written as transformers takes it: "5GB", "1.5GB", "100KB", "2GiB", or bytes."""
    text = str(size).strip()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.upper().endswith(u)), None)
    number = text[: len(text) - len(unit)].strip() if unit else text
    try:
        value = int(float(number) * _UNITS[unit]) if unit else int(number)
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise ValueError(f"max shard size {size!r} is not understood; use a size such as 5GB, 500MB, 100KB or bytes")
    return value


@dataclasses.dataclass(frozen=True)
class Piece:
    """One Mixtral tensor: checkpoint tensor ``source``, transposed if ``transpose``, then rows ``rows``."""

    name: str  # Mixtral key, e.g. "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    source: str  # DCP key, e.g. "model.blocks.0.ffn.experts.w_up.e3"
    transpose: bool = False
    rows: tuple[int, int] | None = None  # [start, end) after the transpose; None: all

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(reversed(source_shape)) if self.transpose else tuple(source_shape)
        return (self.rows[1] - self.rows[0], *shape[1:]) if self.rows else shape

    def take(self, source: torch.Tensor) -> torch.Tensor:
        t = source.t() if self.transpose else source
        return t[self.rows[0] : self.rows[1]] if self.rows else t


def mixtral_pieces(cfg: ModelConfig) -> list[Piece]:
    """Every Mixtral tensor of an expressible model, in file order, and where it comes from.

    Experts are stored one key per global expert; w_up is [D, 2H], gate columns then up columns.
    A tied LM head is omitted (Mixtral's ``tie_word_embeddings`` restores it).
    """
    Hd = cfg.dim // cfg.n_heads
    q, kv, H = cfg.n_heads * Hd, (cfg.n_kv_heads or cfg.n_heads) * Hd, cfg.moe.hidden_dim
    out = [Piece("model.embed_tokens.weight", "model.embed.weight")]
    for i in range(cfg.n_layers):
        b, h = f"model.blocks.{i}.", f"model.layers.{i}."
        out += [
            Piece(h + "input_layernorm.weight", b + "attn_norm.weight"),
            Piece(h + "self_attn.q_proj.weight", b + "attn.wqkv.weight", rows=(0, q)),
            Piece(h + "self_attn.k_proj.weight", b + "attn.wqkv.weight", rows=(q, q + kv)),
            Piece(h + "self_attn.v_proj.weight", b + "attn.wqkv.weight", rows=(q + kv, q + 2 * kv)),
            Piece(h + "self_attn.o_proj.weight", b + "attn.wo.weight"),
            Piece(h + "post_attention_layernorm.weight", b + "ffn_norm.weight"),
            Piece(h + "block_sparse_moe.gate.weight", b + "ffn.router.weight"),
        ]  # fmt: skip
        for e in range(cfg.moe.num_experts):
            x, up = f"{h}block_sparse_moe.experts.{e}.", f"{b}ffn.experts.w_up.e{e}"
            out += [
                Piece(x + "w1.weight", up, transpose=True, rows=(0, H)),  # gate
                Piece(x + "w3.weight", up, transpose=True, rows=(H, 2 * H)),  # up
                Piece(x + "w2.weight", f"{b}ffn.experts.w_down.e{e}", transpose=True),  # down
            ]
    out.append(Piece("model.norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        out.append(Piece("lm_head.weight", "model.head.weight"))
    return out


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """(name, bytes) in file order -> shards of at most ``max_bytes``, split as transformers splits.

    A tensor larger than the limit gets a shard of its own; otherwise a shard is closed when the
    next tensor would tip it over the limit.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, n in sizes:
        if n > max_bytes:
            shards.append([name])
            continue
        if current and current_bytes + n > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += n
    return shards + [current] if current else shards


def checkpoint_model_config(checkpoint_dir: str | Path) -> ModelConfig:
    """A checkpoint's model configuration, from its commit marker (no tensor is read)."""
    from ..train.checkpoint import read_info

    raw = read_info(checkpoint_dir)["model_config"]
    if raw is None:
        raise ValueError(f"{checkpoint_dir} has no model configuration (written by an older version)")
    return ModelConfig(**{**raw, "moe": MoEConfig(**raw["moe"])})


def _tensor_metadata(checkpoint_dir: Path) -> dict:
    """DCP key -> its TensorStorageMetadata (size, dtype), after checking the checkpoint whole
    (``checkpoint.check_readable``: committed, not set aside, every file's size and checksum)."""
    from ..train.checkpoint import check_readable
    from ..train.safe_dcp import read_metadata

    check_readable(checkpoint_dir)
    return read_metadata(checkpoint_dir).state_dict_metadata


def read_tensors(checkpoint_dir: Path, metadata: dict, keys: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors ``keys`` (flat DCP keys, "model.embed.weight"); nothing else is read.

    A tensor holding NaN or infinity is refused: such weights score, sample and export garbage.
    """
    import torch.distributed.checkpoint as dcp

    from ..train.safe_dcp import SafeLoadPlanner, SafeReader

    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        top, _, rest = key.partition(".")
        md = metadata[key]
        nested.setdefault(top, {})[rest] = torch.empty(md.size, dtype=md.properties.dtype)
    with warnings.catch_warnings():  # no process group is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        dcp.load(nested, storage_reader=SafeReader(str(checkpoint_dir)), planner=SafeLoadPlanner(), no_dist=True)
    out = {f"{top}.{rest}": t for top, inner in nested.items() for rest, t in inner.items()}
    bad = [k for k, t in out.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ValueError(
            f"checkpoint {checkpoint_dir} holds non-finite weights ({', '.join(bad[:3])} hold NaN or infinity): the "
            "run had diverged when it was saved; use an earlier checkpoint"
        )
    return out


def read_checkpoint(checkpoint_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A checkpoint (any EP size) as (model config, full model state, experts stacked [E, ...]).

    Reads the model's tensors only (never the optimizer's), all at once: for evaluation and
    tests; ``export_hf_mixtral`` streams instead.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cfg = checkpoint_model_config(checkpoint_dir)
    metadata = _tensor_metadata(checkpoint_dir)
    loaded = read_tensors(checkpoint_dir, metadata, [k for k in metadata if k.startswith("model.")])
    experts: dict[str, dict[int, torch.Tensor]] = {}
    state = {}
    for key, value in loaded.items():
        key = key[len("model.") :]
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


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` holding exactly its own bytes: a view (q of wqkv) would keep its whole source alive."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _write_shard(checkpoint_dir: Path, metadata: dict, pieces: list[Piece], path: Path, dtype: torch.dtype) -> None:
    """Read the checkpoint tensors ``pieces`` come from, one at a time, and write the pieces as one file."""
    from safetensors.torch import save_file

    by_source: dict[str, list[Piece]] = {}
    for p in pieces:
        by_source.setdefault(p.source, []).append(p)
    tensors = {}
    for source, wanted in by_source.items():
        t = read_tensors(checkpoint_dir, metadata, [source])[source]
        tensors.update({p.name: _owned(p.take(t).to(dtype)) for p in wanted})
        del t  # before the next source is read
    save_file({p.name: tensors[p.name] for p in pieces}, str(path), metadata={"format": "pt"})


def export_hf_mixtral(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    max_shard_size: int | str = "5GB",
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` and the weights (safetensors shards of at most ``max_shard_size``).

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors``
    with ``model.safetensors.index.json``, as transformers writes them. ``dtype``: fp32 or bf16.
    ``out_dir`` is new or empty, or with ``overwrite`` emptied first; it never overlaps the
    checkpoint (outdir.py).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    torch_dtype, dtype_name = DTYPES[dtype]
    max_bytes = parse_size(max_shard_size)
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_output_dir(out_dir, checkpoint_dir, overwrite=overwrite, source_name="checkpoint")
    cfg = checkpoint_model_config(checkpoint_dir)
    check_expressible(cfg)  # before any tensor is read

    # The plan, from DCP's metadata alone.
    metadata = _tensor_metadata(checkpoint_dir)
    pieces = mixtral_pieces(cfg)
    missing = sorted({p.source for p in pieces} - set(metadata))
    if missing:
        raise ValueError(f"checkpoint {checkpoint_dir} lacks {missing[0]}, which its model configuration needs")
    item = torch.empty((), dtype=torch_dtype).element_size()
    nbytes = {p.name: math.prod(p.shape(tuple(metadata[p.source].size))) * item for p in pieces}
    shards = plan_shards([(p.name, nbytes[p.name]) for p in pieces], max_bytes)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    # Written into a folder beside OUT, then moved in: a refusal on the way (a non-finite weight, a
    # tokenizer.json changed since the save) or a crash leaves OUT as it was.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        by_name = {p.name: p for p in pieces}
        for file, names in zip(files, shards):
            _write_shard(checkpoint_dir, metadata, [by_name[name] for name in names], staging / file, torch_dtype)
        if n > 1:
            total = sum(nbytes.values())
            index = {
                "metadata": {"total_parameters": total // item, "total_size": total},
                "weight_map": {name: file for file, names in zip(files, shards) for name in names},
            }
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        from ..train.checkpoint import read_info

        tokenizer = read_info(checkpoint_dir).get("tokenizer") or {}
        (staging / "config.json").write_text(json.dumps(hf_config(cfg, dtype_name, tokenizer.get("eos_id")), indent=2))
        write_tokenizer(checkpoint_dir, staging, tokenizer, cfg.max_seq_len)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out_dir.mkdir(exist_ok=True)
    # Any file left (an earlier export's shards, another model's generation_config.json or
    # tokenizer.model) would be loaded alongside these: with --overwrite the folder is emptied.
    if overwrite:
        clear_output_dir(out_dir)
    for f in sorted(staging.iterdir()):
        os.replace(f, out_dir / f.name)
    staging.rmdir()
    return out_dir


def write_tokenizer(checkpoint_dir: Path, out_dir: Path, tokenizer: dict, max_seq_len: int) -> bool:
    """The checkpoint's tokenizer.json beside config.json, and a tokenizer_config.json that makes
    ``AutoTokenizer.from_pretrained(out_dir)`` load it as it is (no BOS, no added tokens).

    False when the checkpoint carries none (checkpoints written before they did, or data prepared
    before meta.json described its tokenizer). ``out_dir`` holds no tokenizer files already: the
    export writes into an empty folder, never the checkpoint's own (outdir.py).
    """
    from ..train.run_info import checkpoint_tokenizer

    source = checkpoint_tokenizer(checkpoint_dir, tokenizer)  # checked against its recorded sha256
    if source is None:
        return False
    shutil.copyfile(source, out_dir / "tokenizer.json")
    config = {
        # Without it AutoTokenizer would pick config.json's model type's class (Llama's), which
        # may add a BOS the model never saw in training.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.get("eos_token"),
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return True
