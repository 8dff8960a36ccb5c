"""A deterministic, resumable, rank-sharded sampler of fixed-length windows.

The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs and
shifted targets). Each epoch visits every window once in a seeded random order; step s takes
the next ``global_batch`` windows of that order and rank r reads its contiguous share. The last
partial global batch of an epoch is dropped. The whole state is ``{"epoch", "position"}``, so a
checkpoint restores the exact next sample, on any world size that divides the global batch.
"""

from __future__ import annotations

import numpy as np
import torch


def check_batch(seq_len: int, global_batch: int, world_size: int) -> None:
    """A window length and a global batch every rank can take an equal share of."""
    if seq_len < 1 or global_batch < 1:
        raise ValueError("trainer.seq_len and trainer.global_batch_size must be >= 1")
    if global_batch % world_size:
        raise ValueError(
            f"trainer.global_batch_size={global_batch} is not divisible by the {world_size} workers; "
            f"use a multiple of {world_size}"
        )


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, rank: int, world_size: int, seed: int):
        check_batch(seq_len, global_batch, world_size)
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < global_batch:
            raise ValueError(
                f"the corpus holds {len(tokens)} tokens: {self.num_windows} windows of trainer.seq_len={seq_len}, "
                f"fewer than one global batch of {global_batch}; lower trainer.seq_len or the batch size"
            )
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position = 0, 0
        self._order = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" not in state:
            raise ValueError(
                f"the checkpoint's sampler state {dict(state)} is a data.mixture's, but this run reads one corpus; "
                "resume with the data settings the run was started with"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_windows, generator=g)
        return self._order

    def next_indices(self) -> torch.Tensor:
        """This rank's window indices for the next global batch (advances the state)."""
        if self.position + self.global_batch > self.num_windows:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        per_rank = self.global_batch // self.world_size
        start = self.position + self.rank * per_rank
        idx = self._epoch_order()[start : start + per_rank]
        self.position += self.global_batch
        return idx

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [global_batch / world_size, seq_len] int64."""
        idx = self.next_indices()
        rows = [self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in idx.tolist()]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]
