"""Corpora, tokenizers, ``prepare``, and the resumable, rank-sharded samplers.

The ``data`` section"s schema (config.py) loads without NumPy or torch.
"""

from .config import DataConfig, MixtureSource


def __getattr__(name: str):
    # Imported on first use (the names below need torch or NumPy); a submodule name falls
    # through to AttributeError, so that ``from . import <submodule>`` imports it.
    if name in ("load_bin", "read_meta", "stdlib_corpus"):
        from . import corpus as module
    elif name in ("MixtureSampler", "read_mixture"):
        from . import mixture as module
    elif name in ("prepare",):
        from . import prepare_corpus as module
    elif name in ("WindowSampler",):
        from . import sampler as module
    elif name in ("load_tokenizer",):
        from . import tokenizer as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


__all__ = ["DataConfig", "MixtureSampler", "MixtureSource", "WindowSampler", "load_bin", "load_tokenizer", "prepare", "read_meta", "read_mixture", "stdlib_corpus"]  # fmt: skip
