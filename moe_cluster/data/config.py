"""The ``data`` section of a job: where the tokens come from. Data only (no torch, no NumPy):
the job's schemas load on machines without the training stack."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

DATA_SOURCES = ("stdlib", "bin")


@dataclass
class MixtureSource:
    path: str  # a folder written by `moe-cluster prepare` (train.bin, val.bin, meta.json)
    weight: float = 1.0  # relative share of the windows (normalised over the sources)


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (the Python standard library, bytes) or "bin" (memmaps)
    path: str | None = None  # folder with train.bin, val.bin and meta.json when source is "bin"
    max_bytes: int | None = None  # read at most this many bytes of the stdlib corpus (tests)
    # source "bin" without a path: windows from several prepared folders, each source's share its
    # weight (moe_cluster/data/mixture.py); the folders must share one tokenizer.
    mixture: list[MixtureSource] = field(default_factory=list)


def check_sources(sources: Sequence[MixtureSource]) -> None:
    """Each source's path and weight, without reading its folder (``validate(files=False)``)."""
    for i, s in enumerate(sources):
        if not (isinstance(s.path, str) and s.path):
            raise ValueError(f"data.mixture[{i}].path must name a prepared folder, got {s.path!r}")
        weight = s.weight
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (number and math.isfinite(weight) and weight > 0):
            raise ValueError(f"data.mixture[{i}].weight must be a number > 0, got {weight!r} (path {s.path})")
