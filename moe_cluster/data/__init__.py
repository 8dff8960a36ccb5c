"""Corpora and the resumable, rank-sharded sampler."""

from .corpus import load_bin, prepare, read_meta, stdlib_corpus
from .sampler import WindowSampler

__all__ = ["WindowSampler", "load_bin", "prepare", "read_meta", "stdlib_corpus"]
