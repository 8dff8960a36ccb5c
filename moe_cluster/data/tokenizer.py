"""The tokenizers ``prepare`` runs: bytes, or a Hugging Face ``tokenizer.json``.

``bytes``: each byte is its own token (ids 0-255) and the end-of-document token is 256, so the
vocabulary is 257. No byte can serve as the separator: NUL occurs in text (a file counts as
binary only when its first 8 KiB hold one), and an EOD that may also be text is no boundary.
The stdlib source (``data.source=stdlib``) stays the 256-byte stream without EODs.

A ``tokenizer.json`` (or a folder holding one, such as a model directory) is run through the
``tokenizers`` library without its special tokens (no BOS is prepended); its end-of-document
token is ``--eos-token``, else the ``eos_token`` of a ``tokenizer_config.json`` beside it, else
the first of ``EOS_CANDIDATES`` the vocabulary holds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BYTES_VOCAB, BYTES_EOS = 257, 256
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to rebuild the tokenizer, and what ``meta.json`` records of it."""

    name: str  # "bytes", or the tokenizer's folder name (the file's stem when it is not tokenizer.json)
    path: str | None  # the tokenizer.json read (absolute); None for bytes
    sha256: str | None  # of that file's bytes: folders prepared with equal hashes share token ids
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int  # appended after every document
    eos_token: str | None  # its text (None for bytes)

    def meta(self) -> dict:
        file = None if self.path is None else "tokenizer.json"  # the copy prepare puts beside the bins
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "file": file}


def load_tokenizer(spec: str, eos_token: str | None = None) -> TokenizerSpec:
    """``"bytes"``, or the path of a ``tokenizer.json`` or of a folder holding one."""
    if spec == "bytes":
        if eos_token is not None:
            raise ValueError("--eos-token applies to a tokenizer.json; the bytes tokenizer's end-of-document id is 256")
        return TokenizerSpec("bytes", None, None, BYTES_VOCAB, BYTES_EOS, None)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        what = f"{path} does not exist" if path.parent.is_dir() and path != Path(spec) else "no such file or folder"
        raise ValueError(
            f"--tokenizer {spec}: {what}; pass a Hugging Face tokenizer.json, a folder holding one, or 'bytes'"
        )
    path = path.resolve()
    tok = hf_tokenizer(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    # An added token may sit past get_vocab_size(): the embedding must cover the largest id.
    vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    eos = eos_token or _configured_eos(path) or next((t for t in EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise ValueError(
            f"{path} has no end-of-document token: none of {', '.join(EOS_CANDIDATES)} is in its vocabulary and "
            "no tokenizer_config.json beside it names an eos_token; pass --eos-token TOKEN"
        )
    if eos not in vocab:
        raise ValueError(f"{path}: the end-of-document token {eos!r} is not in its vocabulary; pass --eos-token TOKEN")
    name = path.parent.name if path.name == "tokenizer.json" else path.stem
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return TokenizerSpec(name or path.stem, str(path), sha, vocab_size, vocab[eos], eos)


@functools.lru_cache(maxsize=4)
def hf_tokenizer(path: str):
    """The parsed tokenizer.json, once per process (each worker loads its own copy)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the library raises a bare Exception with serde's message
        raise ValueError(
            f"{path} does not parse as a Hugging Face tokenizer.json ({str(exc).splitlines()[0][:200]}); "
            "pass the tokenizer.json of a model folder, or 'bytes'"
        ) from None


def _configured_eos(path: Path) -> str | None:
    """The ``eos_token`` of the tokenizer_config.json beside ``path``, if any (a str or {"content": str})."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{config} cannot be read ({exc}); fix it or pass --eos-token TOKEN") from None
    return eos.get("content") if isinstance(eos, dict) else eos


def encode(spec: TokenizerSpec, doc: str | bytes) -> np.ndarray:
    """One document's ids, its end-of-document token included (uint32).

    ``bytes`` keeps a text file's own bytes; a str is encoded as UTF-8. A tokenizer.json gets
    text: a file that is not valid UTF-8 is decoded with replacement characters.
    """
    if spec.path is None:
        data = doc if isinstance(doc, bytes) else doc.encode("utf-8")
        ids = np.empty(len(data) + 1, dtype=np.uint32)
        ids[:-1] = np.frombuffer(data, dtype=np.uint8)
    else:
        text = doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc
        found = hf_tokenizer(spec.path).encode(text, add_special_tokens=False).ids
        ids = np.empty(len(found) + 1, dtype=np.uint32)
        ids[:-1] = found
    ids[-1] = spec.eos_id
    return ids


def decode(spec: TokenizerSpec, ids) -> str:
    """The text of ``ids`` (end-of-document tokens left out), for checks and samples."""
    ids = [int(i) for i in ids if int(i) != spec.eos_id]
    if spec.path is None:
        return bytes(ids).decode("utf-8", errors="replace")
    return hf_tokenizer(spec.path).decode(ids, skip_special_tokens=False)


BYTES_EOS_TOKEN = "<|endoftext|>"  # the text of id 256 in bytes_tokenizer_json's file


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the ByteLevel pre-tokenizer's alphabet), by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bytes_tokenizer_json(eos: bool = True) -> str:
    """A Hugging Face ``tokenizer.json`` giving exactly the bytes tokenizer's ids.

    Byte b is token b (a byte-level BPE with one token per byte and no merges), and with ``eos``
    id 256 is the special token ``BYTES_EOS_TOKEN``. Checkpoints of bytes runs carry it, so their
    Hugging Face exports load with ``AutoTokenizer`` like those of BPE runs; ``eos=False`` is
    the 256-id vocabulary of the stdlib corpus, which has no end-of-document token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _byte_chars().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: every byte of the text, as it is, is one token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if eos:
        tok.add_special_tokens([BYTES_EOS_TOKEN])  # the next id: 256
    return tok.to_str()
