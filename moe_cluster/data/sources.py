"""The documents of a corpus, in ordered chunks that workers read and tokenize independently.

Three kinds of input, as ``moe-cluster prepare SRC`` takes them:

- a folder of text files: each file is one document, read recursively in sorted order. Hidden
  files and folders (a name starting with ".") and binary files (a NUL byte in the first 8 KiB,
  git's test) are skipped and counted.
- JSON Lines (``.jsonl``, or ``.json`` holding one object per line): one document per line, its
  text under ``text_field``; blank lines are skipped.
- Parquet (``.parquet``): one document per row, the ``text_field`` column (read with pyarrow).

SRC is one record file or a folder; a folder holding any record file must hold only record
files (besides hidden ones), since a stray README or CSV would otherwise be read as text.
A chunk is cut from the input alone (a run of text files, a byte range of whole JSONL lines, a
Parquet row group), never from the number of workers: the documents and their order, and so
the output, are the same for every ``--workers``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 4 << 20  # text per chunk: large enough to keep workers busy, small enough to balance them
RECORD_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class Chunk:
    kind: str  # "text", "jsonl" or "parquet"
    paths: tuple[str, ...]  # text: its files, a document each; jsonl and parquet: one file
    start: int = 0  # jsonl: the first byte of its first line; parquet: the row group
    stop: int = 0  # jsonl: the byte after its last line
    size: int = 0  # bytes of input, for the progress bar


def scan(src: str | Path, text_field: str = "text") -> tuple[list[Chunk], dict]:
    """SRC's chunks in document order, and what was found: {"format", "files", "skipped"}."""
    src = Path(src)
    if src.is_file():
        return _record_chunks([src], text_field, {"hidden": 0, "binary": 0})
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
    if not files:
        raise ValueError(f"no files under {src}" + ("" if src.exists() else " (it does not exist)"))
    visible = [f for f in files if not any(part.startswith(".") for part in f.relative_to(src).parts)]
    skipped = {"hidden": len(files) - len(visible), "binary": 0}
    if any(f.suffix.lower() in RECORD_SUFFIXES for f in visible):
        return _record_chunks(visible, text_field, skipped)
    texts = [f for f in visible if not _is_binary(f)]
    skipped["binary"] = len(visible) - len(texts)
    chunks, run, size = [], [], 0
    for f in texts:
        run.append(str(f))
        size += f.stat().st_size
        if size >= CHUNK_BYTES:
            chunks.append(Chunk("text", tuple(run), size=size))
            run, size = [], 0
    if run:
        chunks.append(Chunk("text", tuple(run), size=size))
    return chunks, {"format": "text", "files": len(texts), "skipped": skipped}


def _is_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KiB, git's test."""
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _record_chunks(files: list[Path], text_field: str, skipped: dict) -> tuple[list[Chunk], dict]:
    for f in files:
        if f.suffix.lower() not in RECORD_SUFFIXES:
            raise ValueError(
                f"{f}: unknown extension {f.suffix or '(none)'!r}; prepare reads .jsonl, .json (JSON Lines) and "
                ".parquet files, or a folder of plain text files: move the file out of SRC or convert it"
            )
    chunks: list[Chunk] = []
    for f in files:
        kind = RECORD_SUFFIXES[f.suffix.lower()]
        chunks += _jsonl_chunks(f) if kind == "jsonl" else _parquet_chunks(f, text_field)
    formats = sorted({c.kind for c in chunks} or {RECORD_SUFFIXES[f.suffix.lower()] for f in files})
    return chunks, {"format": "+".join(formats), "files": len(files), "skipped": skipped}


def _jsonl_chunks(path: Path) -> list[Chunk]:
    """Byte ranges of about CHUNK_BYTES, each ending at a line end."""
    size, chunks, start = path.stat().st_size, [], 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + CHUNK_BYTES, size))
            f.readline()  # to the end of the line the cut falls in
            stop = min(f.tell(), size)
            chunks.append(Chunk("jsonl", (str(path),), start, stop, stop - start))
            start = stop
    return chunks


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None


def _parquet_chunks(path: Path, text_field: str) -> list[Chunk]:
    import pyarrow as pa

    pf = _parquet_file(path)
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (its columns: {', '.join(schema.names)}); pass --text-field COLUMN"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not strings; pass --text-field COLUMN")
    meta = pf.metadata
    return [
        Chunk("parquet", (str(path),), g, 0, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)
    ]


def read_chunk(chunk: Chunk, text_field: str = "text") -> list[str | bytes]:
    """The chunk's documents in order: bytes for text files (the tokenizer decides), str otherwise."""
    if chunk.kind == "text":
        return [Path(p).read_bytes() for p in chunk.paths]
    if chunk.kind == "jsonl":
        return _read_jsonl(chunk, text_field)
    if chunk.kind == "parquet":
        return _read_parquet(chunk, text_field)
    raise ValueError(f"unknown chunk kind {chunk.kind!r}")


def _read_jsonl(chunk: Chunk, text_field: str) -> list[str]:
    path = chunk.paths[0]
    with open(path, "rb") as f:
        f.seek(chunk.start)
        lines = f.read(chunk.stop - chunk.start).split(b"\n")
    docs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = functools.partial(_where, path, chunk.start, i)  # a line number costs a read: only on error
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where()}: not a JSON object ({exc}); JSON Lines hold one object per line") from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise ValueError(f"{where()}: holds a JSON {kind}, not an object with a {text_field!r} field")
        if text_field not in record:
            keys = ", ".join(list(record)[:10]) or "none"
            raise ValueError(f"{where()}: no {text_field!r} field (its keys: {keys}); pass --text-field KEY")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where()}: field {text_field!r} holds a {type(text).__name__}, not a string")
        docs.append(text)
    return docs


def _where(path: str, start: int, i: int) -> str:
    """"PATH, line N" for the i-th line of the chunk starting at byte ``start``."""
    with open(path, "rb") as f:
        before = f.read(start).count(b"\n")
    return f"{path}, line {before + i + 1}"


def _read_parquet(chunk: Chunk, text_field: str) -> list[str]:
    path = Path(chunk.paths[0])
    pf = _parquet_file(path)
    texts = pf.read_row_group(chunk.start, columns=[text_field]).column(0).to_pylist()
    if None in texts:
        first = sum(pf.metadata.row_group(g).num_rows for g in range(chunk.start)) + texts.index(None)
        raise ValueError(f"{path}, row {first} (from 0): {text_field!r} is null; drop or fill such rows first")
    return texts
