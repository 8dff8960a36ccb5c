"""A checkpoint in one process: its model, its tokenizer, samples and loss (``moe-cluster sample``/``eval``).

A checkpoint of any EP size, its dense state FSDP-sharded or not, is read as the Hugging Face
export reads it (``interop.hf_mixtral.read_checkpoint``: DCP reshards every tensor whole into
this process, one key per global expert stacked back into [E, ...]). The tokenizer and the
run's evaluation settings come from the checkpoint itself (``train/run_info.py``).

Legend: B batch (windows), S sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import read_meta
from .data.mixture import tokenizer_key
from .data.tokenizer import BYTES_EOS, TokenizerSpec, decode, encode, load_tokenizer
from .interop.hf_mixtral import read_checkpoint
from .model import Transformer
from .model.transformer import rope_tables
from .train import run_info
from .train.checkpoint import read_info
from .train.step import loss_fn
from .train.config import TrainConfig
from .train.trainer import EVAL_SEED, load_tokens, make_sampler


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, dict]:
    """(the checkpoint's model, fp32 weights, in eval mode on ``device``; its info)."""
    cfg, state = read_checkpoint(checkpoint)
    with torch.device("meta"):  # no random init to overwrite: the tensors read become the weights
        model = Transformer(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    # The RoPE tables are not in checkpoints (non-persistent buffers): compute them.
    model.rope_cos, model.rope_sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks {', '.join(missing[:3])}, which its model configuration needs")
    return model.to(device).eval(), read_info(checkpoint)


# -- tokenizer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTokenizer:
    spec: TokenizerSpec
    stop_id: int | None  # the end-of-document id generation stops at; None: the run's data had none

    def encode(self, text: str) -> list[int]:
        return encode(self.spec, text)[:-1].tolist()  # without the end-of-document id encode appends

    def decode(self, ids) -> str:
        return decode(self.spec, ids)


def run_tokenizer(checkpoint: str | Path, info: dict, vocab_size: int, override: str | None = None) -> RunTokenizer:
    """The tokenizer the run's ids mean: the checkpoint's own, or ``override`` ("bytes" or a path)."""
    if override is not None:
        spec = load_tokenizer(override)
        return RunTokenizer(spec, spec.eos_id)
    tok = info.get("tokenizer") or {}
    kind = tok.get("kind") or ("stdlib" if vocab_size == 256 else None)  # older checkpoints: stdlib's bytes
    if kind == "bytes":
        return RunTokenizer(load_tokenizer("bytes"), BYTES_EOS)
    if kind == "stdlib":
        # encode() appends an end-of-document id; 256 is past this vocabulary, and is stripped again.
        return RunTokenizer(TokenizerSpec("stdlib-bytes", None, None, 256, 256, None), None)
    file = run_info.checkpoint_tokenizer(checkpoint, tok) if kind == "hf" else None
    if file is not None:
        spec = load_tokenizer(str(file), eos_token=tok.get("eos_token"))
        spec = dataclasses.replace(spec, name=tok.get("name") or spec.name)  # not the checkpoint folder's name
        return RunTokenizer(spec, tok.get("eos_id", spec.eos_id))
    why = "its tokenizer.json is missing" if kind == "hf" else "it records no tokenizer"
    raise ValueError(
        f"checkpoint {checkpoint}: {why} (written before checkpoints carried one, or trained on data prepared "
        "before meta.json described its tokenizer); pass --tokenizer bytes|PATH, the tokenizer the run's data was "
        "prepared with"
    )


class TextStream:
    """The text of a growing list of ids, handed out as it becomes final (for streaming)."""

    def __init__(self, tokenizer: RunTokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # most likely a character cut between tokens: wait for its other bytes
        return self._new(text)

    def flush(self) -> str:
        return self._new(self.tokenizer.decode(self.ids))

    def _new(self, text: str) -> str:
        new, self.sent = text[self.sent :], len(text)
        return new


def prompt_ids(tokenizer: RunTokenizer, prompt: str, max_seq_len: int, vocab_size: int) -> list[int]:
    """The prompt's ids; an empty prompt starts a document (after an end-of-document id)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.stop_id is None:
            raise ValueError(
                "--prompt is empty and the run's data has no end-of-document token to start after; give a prompt"
            )
        ids = [tokenizer.stop_id]
    if len(ids) > max_seq_len:
        raise ValueError(
            f"the prompt is {len(ids)} tokens, longer than model.max_seq_len={max_seq_len}; shorten the prompt"
        )
    if max(ids) >= vocab_size:
        raise ValueError(
            f"the tokenizer gives id {max(ids)}, past model.vocab_size={vocab_size}: it is not the run's tokenizer"
        )
    return ids


# -- evaluation -----------------------------------------------------------------------------------


def _all_windows(tokens, seq_len: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every window of ``seq_len + 1`` tokens (as the samplers cut them), in order, ``batch`` at a time."""
    streams = tokens if isinstance(tokens, list) else [tokens]
    for stream in streams:
        n = (len(stream) - 1) // seq_len
        for start in range(0, n, batch):
            rows = [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(start, min(n, start + batch))]
            b = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield b[:, :-1], b[:, 1:]


def _check_same_tokenizer(path: str, info: dict) -> None:
    tok = info.get("tokenizer") or {}
    if tok.get("kind") not in ("bytes", "hf"):
        return  # nothing recorded to compare with
    meta = read_meta(path)
    theirs, ours = tokenizer_key(meta), tok.get("sha256") or tok.get("name")
    if theirs != ours:
        raise ValueError(
            f"--data {path} was prepared with tokenizer {meta.get('tokenizer', {}).get('name')!r} "
            f"({theirs[:12]}), the run with {tok.get('name')!r} ({str(ours)[:12]}): its ids mean other text; "
            "prepare it with the run's tokenizer"
        )


@torch.no_grad()
def evaluate(
    model: Transformer, info: dict, *, data: str | None = None, split: str = "val", batches: int | None = None,
    all_windows: bool = False,
) -> dict:
    """Mean cross-entropy (nats/token) over the run's validation windows, or over every window.

    Without ``all_windows``: ``batches`` global batches (default: the run's ``eval_batches``) drawn
    as ``Trainer.evaluate`` draws them (the same seed, sequence length and global batch), so the
    loss is the ``val_loss`` the run logged at the checkpoint's step. The run's sharding does
    not matter: each rank scored its equal share of every batch, and the ranks' mean was logged.
    """
    if split not in ("train", "val"):
        raise ValueError(f"--split must be 'train' or 'val', got {split!r}")
    run = info.get("trainer")
    if run is None:
        raise ValueError("the checkpoint does not record its run's sequence length and batch (written before "
                         "checkpoints did); it cannot be evaluated as its run was")  # fmt: skip
    if data is not None:
        _check_same_tokenizer(data, info)
    data_cfg = run_info.data_config(info, data)
    cfg = TrainConfig(seq_len=run["seq_len"], global_batch_size=run["global_batch_size"])
    tokens = load_tokens(data_cfg, split, model.config.vocab_size)
    device = next(model.parameters()).device
    if all_windows:
        windows = _all_windows(tokens, cfg.seq_len, cfg.global_batch_size)
    else:
        n = run["eval_batches"] if batches is None else batches
        if n < 1:
            raise ValueError(f"--batches must be >= 1, got {n}")
        sampler = make_sampler(tokens, data_cfg, cfg, 0, 1, EVAL_SEED, split=split)
        windows = (sampler.next_batch() for _ in range(n))
    total, count, num_batches = 0.0, 0, 0
    for inputs_BS, targets_BS in windows:
        _, ce = loss_fn(model, inputs_BS.to(device), targets_BS.to(device))
        total += float(ce) * targets_BS.numel()
        count += targets_BS.numel()
        num_batches += 1
    loss = total / count
    return {
        "loss": loss, "perplexity": math.exp(loss), "tokens": count, "batches": num_batches, "split": split,
        "seq_len": cfg.seq_len, "global_batch_size": cfg.global_batch_size, "step": info.get("step"),
    }  # fmt: skip
