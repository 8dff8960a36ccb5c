"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint reads a checkpoint's ``.metadata`` with ``pickle.load`` and each
non-tensor item with ``torch.load(weights_only=False)``: a crafted checkpoint runs its payload in
whoever opens it (``moe-cluster eval``, ``sample``, ``export``, the driver on resume), before any
checksum is looked at. Every read in this project goes through ``SafeReader`` and
``SafeLoadPlanner`` instead:

- ``.metadata`` is unpickled by an unpickler that finds only DCP's metadata classes and the few
  torch values they hold (dtypes, ``torch.Size``, the layout and memory-format encodings, the
  path of the checkpoint); any other global (``os.system``, ``builtins.eval``, ...) is refused.
  It sets state (pickle's BUILD) only on instances of those classes: BUILD on a class or a
  function would rewrite it for the whole process (``pathlib.PurePosixPath._str``, say). Every
  file the metadata names must be a plain name inside the checkpoint folder.
- non-tensor items, which checkpoints written by this version no longer hold (their step and
  sampler state are JSON in the commit marker), are read with ``torch.load(weights_only=True)``:
  plain numbers, strings and containers, as older checkpoints wrote them.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# (module, name) pairs a DCP metadata pickle may name; torch dtypes are admitted by type below.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name ("torch.strided")
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint's metadata names something other than DCP's metadata classes."""


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden one by one; .metadata files are
    small), with globals and BUILD restricted."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_build(self):
        target = self.stack[-2]  # BUILD pops the state (on top), then sets it on the object below
        if not isinstance(target, _INSTANCE_TYPES) or isinstance(target, type):
            raise UnsafeCheckpoint(
                f"its .metadata sets attributes of {target!r}, which DCP metadata never does: the file was crafted; "
                "it was not loaded (nothing in it ran)"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(
            f"its .metadata names {module}.{name}, which DCP metadata never holds: the file was crafted or "
            "is not DCP's; it was not loaded (nothing in it ran)"
        )


def _instance_types() -> tuple[type, ...]:
    import importlib

    found = []
    for module, name in _ALLOWED:
        value = getattr(importlib.import_module(module), name)
        if isinstance(value, type):
            found.append(value)
    return tuple(found)


_INSTANCE_TYPES = _instance_types()


def load_metadata(data: bytes) -> Metadata:
    """A DCP ``Metadata`` from the bytes of a ``.metadata`` file, through the restricted unpickler."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"its .metadata holds a {type(metadata).__name__}, not DCP's Metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not is_plain_name(name):
            raise UnsafeCheckpoint(f"its .metadata names the file {name!r}, outside the checkpoint folder")
    return metadata


def is_plain_name(name: str) -> bool:
    """A file name with no folder part: DCP writes every file of a checkpoint beside .metadata."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


class SafeReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor items read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def read_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of the checkpoint folder ``path``, read safely."""
    return SafeReader(str(path)).read_metadata()
