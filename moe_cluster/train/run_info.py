"""What a checkpoint records of its run beside the weights, so that it can be used on its own.

The commit marker's ``info`` (``checkpoint.read_info``) holds, besides the model configuration:

- ``trainer``: ``seq_len``, ``global_batch_size``, ``eval_batches``, ``seed``: what ``moe-cluster
  eval`` needs to score the very windows the run's ``val_loss`` was measured on;
- ``data``: the data settings (``DataConfig``, folder paths made absolute);
- ``tokenizer``: ``kind`` ("bytes": ids 0-255 and end-of-document 256; "stdlib": the 256 bytes
  of ``data.source=stdlib``, no end-of-document; "hf": a ``tokenizer.json``; "unknown": data
  prepared before meta.json described its tokenizer), ``name``, ``sha256`` (of the data's
  tokenizer.json), ``vocab_size``, ``eos_id``, ``eos_token``, ``file``, ``file_sha256`` (of the
  copy in the checkpoint folder: readers check it before they trust the copy).

And the checkpoint folder holds ``file`` (``tokenizer.json``): the data folder's copy for "hf",
an equivalent byte-level one (``data.tokenizer.bytes_tokenizer_json``) for "bytes" and "stdlib".
So sampling and Hugging Face exports never need the data folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from ..data import read_meta
from ..data.config import DataConfig, MixtureSource
from ..data.tokenizer import BYTES_EOS, BYTES_EOS_TOKEN, bytes_tokenizer_json

TOKENIZER_FILE = "tokenizer.json"  # its name in the checkpoint folder (and in Hugging Face exports)


def checkpoint_info(train_cfg, data_cfg) -> dict:
    """The ``trainer``, ``data`` and ``tokenizer`` entries of a checkpoint's info (see the module docstring)."""
    data = dataclasses.asdict(data_cfg)
    if data.get("path"):
        data["path"] = os.path.abspath(data["path"])
    data["mixture"] = [{**m, "path": os.path.abspath(m["path"])} for m in data.get("mixture") or []]
    return {
        "trainer": {
            "seq_len": train_cfg.seq_len,
            "global_batch_size": train_cfg.global_batch_size,
            "eval_batches": train_cfg.eval_batches,
            "seed": train_cfg.seed,
        },
        "data": data,
        "tokenizer": _never_failing(tokenizer_info, data_cfg),
    }


def _never_failing(fn, data_cfg):
    """A save must not fail for its metadata: a data folder changed under the run is recorded as such."""
    try:
        return fn(data_cfg)
    except (OSError, ValueError) as exc:
        return {"kind": "unknown", "name": None, "sha256": None, "eos_token": None, "file": None,
                "problem": f"{type(exc).__name__}: {exc}"[:300]}  # fmt: skip


def _data_folder(data_cfg) -> Path | None:
    if data_cfg.source != "bin":
        return None
    if data_cfg.mixture:  # the folders share one tokenizer (read_mixture checks it): the first's
        return Path(data_cfg.mixture[0].path)
    return Path(data_cfg.path) if data_cfg.path else None


def tokenizer_info(data_cfg) -> dict:
    """The ``tokenizer`` entry: what the run's token ids mean."""
    if data_cfg.source == "stdlib":
        return {"kind": "stdlib", "name": "stdlib-bytes", "sha256": None, "vocab_size": 256, "eos_id": None,
                "eos_token": None, "file": TOKENIZER_FILE}  # fmt: skip
    folder = _data_folder(data_cfg)
    meta = read_meta(folder)
    tok = meta.get("tokenizer")
    common = {"vocab_size": meta["vocab_size"], "eos_id": meta.get("eos_id"), "folder": str(folder.resolve())}
    if isinstance(tok, dict) and tok.get("name") == "bytes" and not tok.get("file"):
        return {**common, "kind": "bytes", "name": "bytes", "sha256": None, "eos_token": BYTES_EOS_TOKEN,
                "eos_id": BYTES_EOS, "file": TOKENIZER_FILE}  # fmt: skip
    if isinstance(tok, dict) and tok.get("file"):
        has_copy = (folder / tok["file"]).is_file()
        return {**common, "kind": "hf", "name": tok.get("name"), "sha256": tok.get("sha256"),
                "eos_token": meta.get("eos_token"), "file": TOKENIZER_FILE if has_copy else None}  # fmt: skip
    name = tok.get("name") if isinstance(tok, dict) else tok
    return {**common, "kind": "unknown", "name": name, "sha256": None, "eos_token": None, "file": None}


def tokenizer_file(data_cfg, tokenizer: dict) -> bytes | None:
    """The bytes of the ``tokenizer.json`` the checkpoint carries (None: the run's data has none)."""
    if tokenizer["file"] is None:
        return None
    if tokenizer["kind"] in ("bytes", "stdlib"):
        return bytes_tokenizer_json(eos=tokenizer["kind"] == "bytes").encode()
    folder = _data_folder(data_cfg)
    try:
        return (folder / read_meta(folder)["tokenizer"]["file"]).read_bytes()
    except (OSError, ValueError):
        return None  # the checkpoint then lacks it, and `sample` says so


def data_config(info: dict, path: str | None = None):
    """The run's DataConfig from a checkpoint's info; ``path``: read this prepared folder instead."""
    if path is not None:
        return DataConfig(source="bin", path=str(path))
    data = info.get("data")
    if data is None:
        raise ValueError(
            "the checkpoint does not record its data (written before checkpoints did): pass --data PATH, the folder "
            "`moe-cluster prepare` wrote for the run"
        )
    mixture = [MixtureSource(**m) for m in data.get("mixture") or []]
    return DataConfig(**{**data, "mixture": mixture})


# The tokenizer fields whose change makes the same ids mean other text (a tokenizer.json is known
# by its sha256; its name is only the folder it came from).
_TOKENIZER_KEYS = {"hf": ("kind", "sha256", "vocab_size", "eos_id")}
_TOKENIZER_KEYS_DEFAULT = ("kind", "name", "vocab_size", "eos_id")


def resume_changes(info: dict, train_cfg, data_cfg) -> tuple[str | None, list[str]]:
    """How a job resuming a checkpoint differs from the run that wrote it: (a change of tokenizer,
    which no resume may make, or None; the changes of data and sequence shape, one line each).

    ``info`` is the checkpoint's (``checkpoint.read_info``); a key it lacks (written before
    checkpoints recorded it) is not compared.
    """
    now = checkpoint_info(train_cfg, data_cfg)
    saved_tok, tok = info.get("tokenizer") or {}, now["tokenizer"]
    tokenizer = None
    if saved_tok.get("kind") not in (None, "unknown") and tok.get("kind") != "unknown":
        keys = _TOKENIZER_KEYS.get(saved_tok.get("kind"), _TOKENIZER_KEYS_DEFAULT)
        diffs = [k for k in keys if saved_tok.get(k) != tok.get(k)]
        if diffs:
            tokenizer = "; ".join(f"tokenizer {k}: checkpoint {saved_tok.get(k)!r}, job {tok.get(k)!r}" for k in diffs)
    changes = []
    for section in ("data", "trainer"):
        saved = info.get(section) or {}
        for key, value in now[section].items():
            if key in saved and saved[key] != value and key != "eval_batches":  # how much is scored, not what
                changes.append(f"{section}.{key}: checkpoint {saved[key]!r}, job {value!r}")
    return tokenizer, changes


def checkpoint_tokenizer(checkpoint_dir: str | Path, tokenizer: dict) -> Path | None:
    """The checkpoint's copy of its tokenizer.json, checked against the sha256 recorded when it was
    saved; None when the checkpoint carries none. A copy changed since is a ValueError."""
    path = Path(checkpoint_dir) / (tokenizer.get("file") or TOKENIZER_FILE)
    if not tokenizer.get("file") or not path.is_file():
        return None
    expected = tokenizer.get("file_sha256")
    if expected is not None and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise ValueError(
            f"checkpoint {checkpoint_dir}: its {path.name} is not the one saved with it (sha256 differs from the "
            "one recorded at save): it was changed or replaced; restore the checkpoint's own copy, or pass the run's "
            "tokenizer explicitly (sample --tokenizer PATH)"
        )
    return path
