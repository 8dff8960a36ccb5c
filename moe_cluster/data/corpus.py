"""Token corpora: the Python standard library's own sources (byte-level), and .bin memmaps.

The default corpus needs no download: every Python installation carries its standard library.
Files are read in sorted order and split into train and validation by file (every 20th file
goes to validation), so the split is the same on every machine with the same Python version.

Pre-tokenised corpora follow the nanoGPT convention: a flat array of token ids in
``train.bin`` / ``val.bin`` (uint16, or uint32 for vocabularies over 65536), with a
``meta.json`` beside them naming the dtype and vocabulary size (``prepare`` writes all three).
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
    """Byte tokens (uint8) of the standard library's .py files for ``split`` ("train" or "val").

    The full splits are cached as .npy files (``$MOE_CLUSTER_CACHE``, default
    ``~/.cache/moe-cluster``), keyed by the Python installation: reading some 1,800 files takes
    seconds, which a worker restarting after a failure should not spend again.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if max_bytes is None:
        cache = _cache_path(split)
        if cache.is_file():
            return np.load(cache, mmap_mode="r")
        tokens = _read_stdlib(split, None)
        _write_atomic(cache, tokens)
        return tokens
    return _read_stdlib(split, max_bytes)


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


def load_bin(path: str | Path, vocab_size: int) -> np.ndarray:
    """Memory-map a pre-tokenised ``.bin``, checking its dtype and vocabulary against meta.json."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token file {path} does not exist; create it with `moe-cluster prepare`")
    meta_path = path.with_name("meta.json")
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} is missing: it names the dtype and vocab of {path.name}")
    meta = json.loads(meta_path.read_text())
    dtype = meta.get("dtype")
    if dtype not in BIN_DTYPES:
        raise ValueError(f"{meta_path}: dtype {dtype!r} is not one of {', '.join(BIN_DTYPES)}")
    if meta.get("vocab_size", 0) > vocab_size:
        raise ValueError(
            f"{path} holds token ids up to vocab_size={meta['vocab_size']} but the model has "
            f"model.vocab_size={vocab_size}; raise model.vocab_size or re-tokenise"
        )
    itemsize = np.dtype(BIN_DTYPES[dtype]).itemsize
    if path.stat().st_size % itemsize:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, not a whole number of {dtype} tokens")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} holds no tokens")
    return np.memmap(path, dtype=BIN_DTYPES[dtype], mode="r")


def prepare(src: str | Path, out: str | Path, val_every: int = VAL_EVERY) -> dict:
    """Byte-tokenise every text file under ``src`` into ``out``/{train,val}.bin and meta.json."""
    src, out = Path(src), Path(out)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"no files under {src}")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        keep = [f for i, f in enumerate(files) if (i % val_every == 0) == (split == "val")] or files[:1]
        data = np.frombuffer(b"".join(f.read_bytes() + b"\n\n" for f in keep), dtype=np.uint8)
        data.astype(np.uint16).tofile(out / f"{split}.bin")
        counts[split] = int(data.size)
    meta = {"dtype": "uint16", "vocab_size": 256, "tokenizer": "bytes", "tokens": counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
