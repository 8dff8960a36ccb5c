"""A mixture of prepared corpora: ``data.mixture=[{path: A, weight: 0.7}, {path: B, weight: 0.3}]``.

Window n of the run (counted over all steps, before the ranks' split) comes from the source
furthest behind its share: the k maximising ``weight_k * (n + 1) - taken_k``, ties to the first.
So every source's count stays within a window of ``weight_k * n`` at every step (a random draw
of 1,000 windows at 0.7 would stray by 1.4% at one standard deviation), and the choice needs no
random state. Within a source, windows come in a seeded random order per epoch, as in
WindowSampler, and a source that runs out starts its next epoch on its own.

Each step the ranks compute the same global batch and take their contiguous shares, so the
windows do not depend on the world size. The state is the step and each source's (epoch,
position): small lists of ints, so a checkpoint restores the exact next window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from .config import MixtureSource, check_sources
from .corpus import read_meta
from .sampler import check_batch


def tokenizer_key(meta: dict) -> str:
    """What identifies a folder's token ids: its tokenizer.json's sha256, else the tokenizer's name."""
    tok = meta.get("tokenizer")
    if isinstance(tok, dict):
        return tok.get("sha256") or tok.get("name") or "unknown"
    return str(tok) if tok else "unknown"  # folders from before meta.json described the tokenizer


def read_mixture(sources: Sequence[MixtureSource]) -> dict:
    """The checked folders of ``data.mixture``, merged: {"vocab_size", "max_token_id", "tokenizer"}.

    Raises ValueError for a weight that is not a positive number, a folder that is missing or
    incomplete (read_meta), or folders prepared with different tokenizers.
    """
    if not sources:
        raise ValueError("data.mixture is empty; list at least one {path: FOLDER, weight: W}")
    check_sources(sources)
    metas = [read_meta(s.path) for s in sources]
    first = tokenizer_key(metas[0])
    for s, meta in zip(sources[1:], metas[1:]):
        if tokenizer_key(meta) != first:
            raise ValueError(
                f"data.mixture mixes tokenizers: {sources[0].path} was prepared with {_describe(metas[0])} but "
                f"{s.path} with {_describe(meta)}; prepare every folder with the same --tokenizer"
            )
    return {
        "vocab_size": max(m["vocab_size"] for m in metas),
        "max_token_id": max(m["max_token_id"] for m in metas),
        "tokenizer": metas[0].get("tokenizer"),
    }


def _describe(meta: dict) -> str:
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and tok.get("sha256"):
        return f"{tok.get('name')} ({tok.get('path')}, sha256 {tok['sha256'][:12]})"
    return repr(tok.get("name") if isinstance(tok, dict) else tok)


class MixtureSampler:
    """Windows of ``seq_len + 1`` tokens from several token streams, each stream's share its weight."""

    def __init__(
        self, sources: Sequence[np.ndarray], weights: Sequence[float], seq_len: int, global_batch: int,
        rank: int, world_size: int, seed: int,
    ):  # fmt: skip
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"got {len(sources)} token streams and {len(weights)} weights; give one weight per stream")
        check_batch(seq_len, global_batch, world_size)
        if any(not (math.isfinite(w) and w > 0) for w in weights):
            raise ValueError(f"mixture weights must be numbers > 0, got {list(weights)}")
        self.num_windows = [(len(t) - 1) // seq_len for t in sources]
        for k, n in enumerate(self.num_windows):
            if n < 1:
                raise ValueError(
                    f"data.mixture[{k}] holds {len(sources[k])} tokens in this split, less than one window of "
                    f"trainer.seq_len={seq_len} + 1; lower trainer.seq_len or prepare more text"
                )
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.sources, self.seq_len, self.global_batch = list(sources), seq_len, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.step = 0
        self.epochs, self.positions = [0] * len(sources), [0] * len(sources)
        self._orders: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (epoch, its window order)

    def state_dict(self) -> dict:
        return {"step": self.step, "source_epochs": list(self.epochs), "source_positions": list(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        if "source_epochs" not in state:
            raise ValueError(
                f"the checkpoint's sampler state {dict(state)} is a single corpus's, but this run reads data.mixture; "
                "resume with the data settings the run was started with"
            )
        if len(state["source_epochs"]) != len(self.sources):
            raise ValueError(
                f"the checkpoint's sampler state has {len(state['source_epochs'])} mixture sources, data.mixture has "
                f"{len(self.sources)}; resume with the data settings the run was started with"
            )
        self.step = int(state["step"])
        self.epochs = [int(e) for e in state["source_epochs"]]
        self.positions = [int(p) for p in state["source_positions"]]
        self._orders.clear()

    def _order(self, k: int) -> torch.Tensor:
        epoch = self.epochs[k]
        if self._orders.get(k, (None,))[0] != epoch:
            # A seed per (seed, source, epoch), hashed so that no two of them collide.
            key = hashlib.sha256(f"{self.seed}/{k}/{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
            self._orders[k] = (epoch, torch.randperm(self.num_windows[k], generator=g))
        return self._orders[k][1]

    def _take(self, k: int) -> int:
        window = int(self._order(k)[self.positions[k]])
        self.positions[k] += 1
        if self.positions[k] == self.num_windows[k]:
            self.epochs[k], self.positions[k] = self.epochs[k] + 1, 0
        return window

    def next_indices(self) -> list[tuple[int, int]]:
        """This rank's (source, window) pairs of the next global batch (advances the state)."""
        taken = [e * n + p for e, n, p in zip(self.epochs, self.num_windows, self.positions)]
        done = self.step * self.global_batch  # == sum(taken)
        picks = []
        for n in range(done, done + self.global_batch):
            k = max(range(len(taken)), key=lambda k: self.weights[k] * (n + 1) - taken[k])
            picks.append((k, self._take(k)))
            taken[k] += 1
        self.step += 1
        per_rank = self.global_batch // self.world_size
        return picks[self.rank * per_rank : (self.rank + 1) * per_rank]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [global_batch / world_size, seq_len] int64."""
        s = self.seq_len
        rows = [self.sources[k][i * s : i * s + s + 1] for k, i in self.next_indices()]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]
