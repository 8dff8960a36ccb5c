"""Token corpora: the Python standard library's own sources (byte-level), and .bin memmaps.

The default corpus needs no download: every Python installation carries its standard library.
Files are read in sorted order and split into train and validation by file (every 20th file
goes to validation), so the split is the same on every machine with the same Python version.

Pre-tokenised corpora follow the nanoGPT convention: a flat array of token ids in
``train.bin`` / ``val.bin`` (uint16, or uint32 for vocabularies over 65536), with a
``meta.json`` beside them naming the dtype, the vocabulary size and the largest token id in the
data (``prepare``, in prepare_corpus.py, writes them with the tokenizer and its end-of-document
id; ``read_meta`` and ``load_bin`` check them).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

VAL_EVERY = 20  # every 20th file of the stdlib corpus goes to the validation split
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise ValueError(f"found no .py files under the standard library at {root}; use data.source=bin")
    return files


def stdlib_corpus(split: str, max_bytes: int | None = None) -> np.ndarray:
    """Byte tokens (uint8) of the standard library's .py files for ``split`` ("train" or "val"),
    the first ``max_bytes`` of them when given.

    The full splits are cached as .npy files (``$MOE_CLUSTER_CACHE``, default
    ``~/.cache/moe-cluster``), keyed by the Python installation: listing and reading some 1,800
    files takes about a second, which a worker joining a group (at every start, heal and resize)
    should not spend again. A ``max_bytes`` corpus is the prefix of the full one, so it is read
    from the same cache.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    cache = _cache_path(split)
    if cache.is_file():
        tokens = np.load(cache, mmap_mode="r")
    else:
        tokens = _read_stdlib(split, None)
        _write_atomic(cache, tokens)
    return tokens if max_bytes is None else tokens[:max_bytes]


def _cache_path(split: str) -> Path:
    root = Path(os.environ.get("MOE_CLUSTER_CACHE", Path.home() / ".cache" / "moe-cluster"))
    key = hashlib.sha1(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{VAL_EVERY}".encode()).hexdigest()[:12]
    return root / f"stdlib-{key}-{split}.npy"


def _write_atomic(path: Path, tokens: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.save(f, tokens)
        os.replace(f.name, path)  # concurrent workers may race: each rename is whole
    except OSError:
        pass  # a read-only home only costs the next start the same few seconds


def _read_stdlib(split: str, max_bytes: int | None) -> np.ndarray:
    files = stdlib_files()
    keep = [f for i, f in enumerate(files) if (i % VAL_EVERY == 0) == (split == "val")]
    chunks, total = [], 0
    for f in keep:
        data = f.read_bytes() + b"\n\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return tokens[:max_bytes] if max_bytes is not None else tokens


def read_meta(folder: str | Path) -> dict:
    """The validated ``meta.json`` of a prepared folder (``train.bin``, ``val.bin``, ``meta.json``).

    Raises ValueError, naming the file and the fix, when the folder or a file is missing or the
    meta is incomplete. ``max_token_id`` (the largest id in the data) is filled in as
    ``vocab_size - 1`` for folders written before ``prepare`` recorded it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist; create it with `moe-cluster prepare SRC {folder}`")
    for name in ("train.bin", "val.bin", "meta.json"):
        if not (folder / name).is_file():
            raise ValueError(
                f"{folder / name} is missing; re-create the folder with `moe-cluster prepare SRC {folder}`"
            )
    return _check_meta(folder / "meta.json")


def _check_meta(meta_path: Path) -> dict:
    fix = f"re-create it with `moe-cluster prepare SRC {meta_path.parent}`"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path} cannot be read ({exc}); {fix}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a {type(meta).__name__}, not a JSON object; {fix}")
    dtype = meta.get("dtype")
    if dtype not in BIN_DTYPES:
        raise ValueError(f"{meta_path}: dtype {dtype!r} is not one of {', '.join(BIN_DTYPES)}; {fix}")
    vocab = meta.get("vocab_size")
    if vocab is None:
        raise ValueError(
            f"{meta_path} has no vocab_size, so the token ids cannot be checked against the model; {fix} "
            "(or add the tokenizer's \"vocab_size\")"
        )
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"{meta_path}: vocab_size must be an integer >= 1, got {vocab!r}; {fix}")
    largest = meta.get("max_token_id", vocab - 1)  # folders from before prepare recorded it
    if isinstance(largest, bool) or not isinstance(largest, int) or not 0 <= largest < vocab:
        raise ValueError(
            f"{meta_path}: max_token_id must be an integer in [0, vocab_size={vocab}), got {largest!r}; {fix}"
        )
    eos = meta.get("eos_id")  # folders from before prepare added end-of-document tokens have none
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab):
        raise ValueError(f"{meta_path}: eos_id must be an integer in [0, vocab_size={vocab}), got {eos!r}; {fix}")
    if largest > np.iinfo(BIN_DTYPES[dtype]).max:
        what = f"max_token_id={largest}" if "max_token_id" in meta else f"vocab_size={vocab} (no max_token_id)"
        raise ValueError(f"{meta_path}: {what} does not fit in {dtype}; {fix}")
    return {**meta, "max_token_id": largest}


# The sample load_bin reads: at most this many evenly spaced chunks of this many tokens (4 MiB
# of uint32 at most), so checking a 100 GB file costs 64 small reads, not a full pass.
SAMPLE_CHUNKS, SAMPLE_CHUNK_TOKENS = 64, 16 * 1024


def load_bin(path: str | Path, vocab_size: int) -> np.ndarray:
    """Memory-map a pre-tokenised ``.bin``, checked against its ``meta.json`` and the model.

    Cheap checks only: the file size is a whole number of tokens, the data's largest id
    (``max_token_id`` in meta.json) is below ``vocab_size`` (``model.vocab_size``), and a sample
    of the file holds no id above that. An id past the embedding would otherwise surface as an
    IndexError inside the model, on every restart.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token file {path} does not exist; create it with `moe-cluster prepare`")
    meta_path = path.with_name("meta.json")
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} is missing: it names the dtype and vocab of {path.name}")
    meta = _check_meta(meta_path)
    dtype, largest = meta["dtype"], meta["max_token_id"]
    size = path.stat().st_size
    if size % np.dtype(BIN_DTYPES[dtype]).itemsize:
        raise ValueError(f"{path} is {size} bytes, not a whole number of {dtype} tokens; re-run `moe-cluster prepare`")
    if size == 0:
        raise ValueError(f"{path} holds no tokens")
    if largest >= vocab_size:
        raise ValueError(
            f"{path} holds token ids up to {largest} (max_token_id in {meta_path.name}) but the model has "
            f"model.vocab_size={vocab_size}; raise model.vocab_size to at least {largest + 1} or re-tokenise"
        )
    tokens = np.memmap(path, dtype=BIN_DTYPES[dtype], mode="r")
    found, at = _sample_max(tokens)
    if found > largest:
        raise ValueError(
            f"{path} holds token id {found} (near token {at:,}) but {meta_path.name} says the largest id is "
            f"{largest}: the data and its meta.json disagree; re-run `moe-cluster prepare`"
        )
    return tokens


def _sample_max(tokens: np.ndarray) -> tuple[int, int]:
    """The largest id in up to SAMPLE_CHUNKS evenly spaced chunks (first and last included), and where."""
    n, chunk = len(tokens), SAMPLE_CHUNK_TOKENS
    starts = [0] if n <= chunk else np.linspace(0, n - chunk, min(SAMPLE_CHUNKS, -(-n // chunk))).astype(np.int64)
    best, at = -1, 0
    for s in starts:
        part = tokens[int(s) : int(s) + chunk]
        i = int(part.argmax())
        if int(part[i]) > best:
            best, at = int(part[i]), int(s) + i
    return best, at
