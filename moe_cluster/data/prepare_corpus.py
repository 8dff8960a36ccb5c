"""``moe-cluster prepare``: documents in, ``train.bin`` / ``val.bin`` / ``meta.json`` out.

Each document's tokens are followed by the tokenizer's end-of-document token. Documents are
numbered in input order (sources.py) and every ``val_every``-th one, the first included, goes to
validation: deterministic, the same for a corpus as JSONL or as Parquet, and never empty (the
first document is always there). Workers tokenize the chunks of sources.py in parallel; the
results are taken back in chunk order and split here, by document number, so the bins are
byte-identical whatever the number of workers.

The output folder is self-contained: the tokenizer.json read is copied beside the bins, and
``meta.json`` records the tokenizer (name, path, sha256), vocab_size, eos_id, dtype (uint16 when
the vocabulary fits, else uint32), documents and tokens per split, and the largest token id.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..outdir import check_output_dir, clear_output_dir
from .sources import Chunk, read_chunk, scan
from .tokenizer import TokenizerSpec, encode, load_tokenizer


def prepare(
    src: str | Path,
    out: str | Path,
    *,
    tokenizer: str = "bytes",
    text_field: str = "text",
    val_fraction: float = 0.005,
    val_every: int | None = None,
    workers: int = 1,
    eos_token: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Tokenize SRC into OUT; returns the meta written. See the module docstring.

    ``val_fraction`` becomes "every round(1 / val_fraction)-th document"; ``val_every`` gives
    that period directly (the CLI's ``--val-every``). Nothing is left in OUT when this raises.
    OUT is new or empty; with ``overwrite`` a non-empty OUT is emptied, once the bins are written
    (a run that fails removes nothing). OUT never overlaps SRC (outdir.py): inside a folder of text
    files it would be read as input.
    """
    every = _val_period(val_fraction, val_every)
    src, out = Path(src), Path(out)
    check_output_dir(out, src, overwrite=overwrite, source_name="source")
    spec = load_tokenizer(tokenizer, eos_token)  # a tokenizer that does not parse fails before any reading
    chunks, found = scan(src, text_field)
    dtype = np.uint16 if spec.vocab_size <= 1 << 16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        counts = _write_bins(chunks, spec, text_field, dtype, every, workers, tmp, progress)
        docs = counts["documents"]
        if docs["train"] == 0:
            skipped = found["skipped"]
            raise ValueError(
                f"{src} holds {docs['val']} document(s) in {found['files']} file(s) (skipped {skipped['hidden']} "
                f"hidden and {skipped['binary']} binary); training and validation need one document each at "
                "least: add documents"
            )
        meta = {
            "dtype": np.dtype(dtype).name,
            "vocab_size": spec.vocab_size,
            "eos_id": spec.eos_id,
            "eos_token": spec.eos_token,
            "max_token_id": counts["max_token_id"],
            "tokenizer": spec.meta(),
            "documents": docs,
            "tokens": counts["tokens"],
            "val_every": every,
            "source": {"path": str(src.resolve()), "format": found["format"], "files": found["files"]},
            "skipped": found["skipped"],
            "not_utf8": counts["not_utf8"],  # text files decoded with replacement characters
        }
        if found["format"] != "text":
            meta["source"]["text_field"] = text_field
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if spec.path is not None:
            shutil.copyfile(spec.path, tmp / "tokenizer.json")
        out.mkdir(exist_ok=True)
        if overwrite:  # everything is read: the source, the tokenizer (which may have been in OUT)
            clear_output_dir(out)  # a bytes run must not leave an older BPE's tokenizer.json, for one
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _val_period(val_fraction: float, val_every: int | None) -> int:
    if val_every is not None:
        if val_every < 2:
            raise ValueError(f"--val-every must be >= 2 (every N-th document goes to validation), got {val_every}")
        return val_every
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"--val-fraction must be in (0, 0.5], got {val_fraction}")
    return max(2, round(1 / val_fraction))


def _write_bins(chunks, spec, text_field, dtype, every, workers, tmp: Path, progress) -> dict:
    """Tokenize the chunks (in order) into tmp/{train,val}.bin; the counts for meta.json."""
    from tqdm import tqdm

    docs, tokens = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    largest, not_utf8, next_doc = 0, 0, 0
    bar = tqdm(total=sum(c.size for c in chunks), unit="B", unit_scale=True, desc="prepare", disable=not progress)
    with open(tmp / "train.bin", "wb") as train, open(tmp / "val.bin", "wb") as val, bar:
        for chunk, (ids, lengths, bad) in zip(chunks, _tokenized(chunks, spec, text_field, dtype, workers)):
            is_val = (np.arange(next_doc, next_doc + len(lengths)) % every) == 0
            mask = np.repeat(is_val, lengths)
            ids[~mask].tofile(train)
            ids[mask].tofile(val)
            docs["val"] += int(is_val.sum())
            docs["train"] += len(lengths) - int(is_val.sum())
            tokens["val"] += int(mask.sum())
            tokens["train"] += len(ids) - int(mask.sum())
            if len(ids):
                largest = max(largest, int(ids.max()))
            not_utf8 += bad
            next_doc += len(lengths)
            bar.update(chunk.size)
    return {"documents": docs, "tokens": tokens, "max_token_id": largest, "not_utf8": not_utf8}


def _tokenized(chunks: list[Chunk], spec: TokenizerSpec, text_field: str, dtype, workers: int):
    """(ids, document lengths, documents not valid UTF-8) per chunk, in chunk order."""
    jobs = [(c, spec, text_field, dtype) for c in chunks]
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        yield from map(_tokenize_chunk, jobs)
        return
    # fork: a worker starts at once, with the modules already imported (a spawned one would import
    # torch through the moe_cluster package first, seconds each). The workers only read files and run
    # the tokenizer, so fork's hazards (CUDA, thread pools) do not reach them; the tokenizers library
    # is never run in parallel here, and workers encode one document at a time.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        yield from pool.imap(_tokenize_chunk, jobs)


def _tokenize_chunk(job: tuple[Chunk, TokenizerSpec, str, type]) -> tuple[np.ndarray, np.ndarray, int]:
    chunk, spec, text_field, dtype = job
    pieces, not_utf8 = [], 0
    for doc in read_chunk(chunk, text_field):
        if isinstance(doc, bytes) and spec.path is not None:  # a text file, for a tokenizer of text
            try:
                doc = doc.decode("utf-8")
            except UnicodeDecodeError:
                doc, not_utf8 = doc.decode("utf-8", errors="replace"), not_utf8 + 1
        pieces.append(encode(spec, doc))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ids = np.concatenate(pieces).astype(dtype) if pieces else np.empty(0, dtype=dtype)
    return ids, lengths, not_utf8
