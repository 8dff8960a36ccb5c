"""Corpora, tokenizers, ``prepare``, and the resumable, rank-sharded samplers."""

from .corpus import load_bin, read_meta, stdlib_corpus
from .mixture import MixtureSampler, MixtureSource, read_mixture
from .prepare_corpus import prepare
from .sampler import WindowSampler
from .tokenizer import load_tokenizer

__all__ = [
    "MixtureSampler", "MixtureSource", "WindowSampler", "load_bin", "load_tokenizer", "prepare", "read_meta",
    "read_mixture", "stdlib_corpus",
]  # fmt: skip
