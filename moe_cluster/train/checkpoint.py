"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, re-shardable.

Layout: ``<dir>/step_00000100/`` holds DCP's files and, once complete, a ``COMMITTED`` marker.
A checkpoint without the marker (a save cut short) is never loaded, and is removed by the next
save. Only the newest ``keep`` complete checkpoints are kept.

Nothing in a checkpoint is read as a pickle that could run code (``safe_dcp``): DCP's
``.metadata`` goes through a restricted unpickler, and the non-tensor state (step, sampler) is
JSON in the commit marker, which also holds the CRC-32 of every file DCP wrote, ``.metadata``
included. A checkpoint with a non-finite weight is never committed.

Expert weights and their optimizer state are stored one key per global expert
(``blocks.0.ffn.experts.w_up.e5``), so a checkpoint written with one EP size loads onto any
other: each rank asks for the experts it holds. Replicated tensors (dense weights, or an expert
held by several expert-data-parallel ranks) are written once by DCP's planner.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..model import ModelConfig, architecture_differences
from ..parallel import ProcessGroups, is_expert_param, on_current_mesh, shard_offset
from .safe_dcp import SafeLoadPlanner, SafeReader, is_plain_name, read_metadata

MARKER = "COMMITTED"
METADATA = ".metadata"  # DCP's index of the checkpoint's items
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _expand(name: str, tensor: torch.Tensor, local: range, expert: bool, meshes: dict) -> dict[str, torch.Tensor]:
    """One entry, or one per global expert for expert tensors (views, so loads write in place).

    Under FSDP a tensor is a DTensor. A dense one goes to DCP as it is (DCP saves each rank's
    shard and reshards at load). An expert tensor is the rank's EP slice ``local``, sharded again
    over its expert-data-parallel group: by whole experts (each rank then names the experts of its
    chunk) or by rows (each expert's entry is then a DTensor over that group).
    """
    if isinstance(tensor, DTensor):
        tensor = on_current_mesh(tensor, meshes)  # DCP places shards by the mesh's coordinate
    if not expert:
        return {name: tensor}
    if not isinstance(tensor, DTensor):
        return {f"{name}.e{e}": tensor[i] for i, e in enumerate(local)}
    dim, offset = shard_offset(tensor)
    piece = tensor.to_local()
    if dim == 0:
        return {f"{name}.e{local[offset + i]}": piece[i] for i in range(piece.shape[0])}
    shape = tuple(tensor.shape[1:])
    stride = tuple(torch.empty(shape, device="meta").stride())
    mesh, placements = tensor.device_mesh, [Shard(dim - 1)]
    return {
        f"{name}.e{e}": DTensor.from_local(piece[i], mesh, placements, run_check=False, shape=shape, stride=stride)
        for i, e in enumerate(local)
    }


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state per parameter name, as live tensors (loading writes into the optimizer)."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                # AdamW creates its state lazily at the first step; loading needs tensors to load into.
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            out[names[p]] = optimizer.state[p]
    return out


def build_state(model: nn.Module, optim_state: dict[str, dict], groups: ProcessGroups, extra: dict) -> dict:
    """The flat DCP state of this rank. Tensors are views, so loading writes into the live objects.

    ``optim_state`` maps each parameter name to its ``exp_avg``, ``exp_avg_sq`` and ``step``;
    ``extra`` holds tensors only (the RNG state): what is not a tensor goes into the commit
    marker's ``info``, as JSON.
    """
    local = groups.layout.local_experts(groups.rank)
    model_state, flat_optim, meshes = {}, {}, {}
    for name, p in model.named_parameters():
        model_state.update(_expand(name, p.data, local, is_expert_param(name), meshes))
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    for name, buf in model.named_buffers():
        if name not in non_persistent:  # e.g. the routers' expert bias (auxiliary-loss-free balancing)
            model_state[name] = buf
    for name, state in optim_state.items():
        expert = is_expert_param(name)
        for key in ("exp_avg", "exp_avg_sq"):
            flat_optim.update(_expand(f"{name}.{key}", state[key], local, expert, meshes))
        flat_optim[f"{name}.step"] = state["step"]
    return {"model": model_state, "optim": flat_optim, "extra": extra}


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def save(
    root: str | Path, step: int, state: dict, keep: int = 3, info: dict | None = None, files: dict | None = None
) -> Path:
    """Write ``state`` as the checkpoint of ``step``; collective over all ranks.

    ``info`` (JSON values: the model configuration, the sampler's state) goes into the commit
    marker, where ``read_info`` finds it without reading any tensor. ``files`` (name -> bytes,
    given on rank 0: the run's tokenizer.json) are written into the checkpoint before it is
    committed. A state with a non-finite weight raises ``NonFiniteState`` before anything is written.
    """
    _check_finite(state["model"], step)
    path = step_dir(root, step)
    if _is_rank0():
        # This step's directory and any later ones belong to a timeline abandoned by a failure
        # (a save cut short, or checkpoints past the point the run resumed from).
        _remove_from(Path(root), step)
        path.mkdir(parents=True)
    _barrier()
    try:
        dcp.save(state, checkpoint_id=str(path))
    except CheckpointException as exc:  # its message names the failing ranks only: say what failed
        raise _write_error(path, exc, state) from exc
    # Each rank checksums the shards it wrote (still in its page cache), so that a load can tell
    # a garbled shard from a good one: DCP itself reads garbage tensor bytes without complaint.
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {f.name: _crc32(f) for f in sorted(path.glob(f"__{rank}_*.distcp"))}
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)  # also the barrier: every rank has written its shards
        mine = {k: v for g in gathered for k, v in g.items()}
    if _is_rank0():
        mine[METADATA] = _crc32(path / METADATA)  # written by the coordinator (rank 0) at the end of dcp.save
        for name, data in (files or {}).items():
            (path / name).write_bytes(data)
        tmp = path / f".{MARKER}.tmp"
        tmp.write_text(json.dumps({**(info or {}), "step": step, "crc32": mine}))
        os.replace(tmp, path / MARKER)  # atomic: the checkpoint exists from here on
        _prune(Path(root), keep)
    _barrier()
    return path


class CheckpointWriteError(OSError):
    """A save that failed writing, with the OSError's errno (ENOSPC: the disk is full)."""


class NonFiniteState(ValueError):
    """Weights that are NaN or infinite: such a state is never committed as a checkpoint."""


def _check_finite(model_state: dict, step: int) -> None:
    """Raise NonFiniteState on every rank when any rank holds a non-finite weight."""
    bad = [name for name, t in model_state.items() if torch.is_tensor(t) and not _local(t).isfinite().all()]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, bad[:3])
        bad = [name for g in gathered for name in g]
    if bad:
        names = ", ".join(sorted(set(bad))[:3])
        raise NonFiniteState(
            f"not committing the checkpoint of step {step}: the weights are not finite ({names}); the run diverged "
            "(trainer.nan_policy), and its earlier checkpoints are kept"
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _write_error(path: Path, exc: CheckpointException, state: dict) -> Exception:
    """What a failed save raises: an OSError that keeps its errno, so that a full disk is told apart
    from a passing fault and the message names the cause; else a RuntimeError naming what failed.

    torch's writer does not always say ENOSPC: its zip container can fail on a short write with a
    RuntimeError ("unexpected pos"). A disk left with less room than this rank's share is full.
    """
    for rank, error in _rank_errors(exc).items():
        if isinstance(error, OSError) and error.errno is not None:
            what = f"saving checkpoint {path} failed on rank {rank}: {error.strerror or error}"
            return CheckpointWriteError(error.errno, what)
    need = sum(t.numel() * t.element_size() for t in _tensors(state))
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None  # the disk cannot even be asked: DCP's own error says more
    if free is not None and free < need:
        return CheckpointWriteError(
            errno.ENOSPC, f"saving checkpoint {path} failed: No space left on device ({free:,} bytes free, this "
            f"rank's share is {need:,}; {_failures(exc)})",
        )  # fmt: skip
    return RuntimeError(f"saving checkpoint {path} failed: {_failures(exc)}")


def _tensors(state: dict):
    for value in state.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif torch.is_tensor(value):
            yield _local(value)


def _rank_errors(exc: BaseException) -> dict[int, BaseException]:
    """Each failed rank's own exception inside DCP's CheckpointException (whose ``failures`` maps a
    rank to an (exception, traceback) pair); {} for any other exception."""
    failures = getattr(exc, "failures", None) or {}
    return {r: f[0] if isinstance(f, tuple) else f for r, f in failures.items()}


def _failures(exc: CheckpointException) -> str:
    return "; ".join(f"rank {r}: {_first_line(e)}" for r, e in _rank_errors(exc).items()) or str(exc)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def _remove_from(root: Path, step: int) -> None:
    if not root.is_dir():
        return
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and int(m.group(1)) >= step:
            shutil.rmtree(d)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` committed checkpoints. No checkpoint with a non-finite weight is ever
    committed (``save``), so the newest finite one is always among those kept."""
    complete = complete_checkpoints(root)
    newest = complete[-1][0] if complete else -1
    for s, d in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():  # partial checkpoints older than the newest complete one
        m = _STEP_DIR.match(d.name)
        if m and not (d / MARKER).is_file() and int(m.group(1)) < newest:
            shutil.rmtree(d, ignore_errors=True)


def _marker(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def load(path: str | Path, state: dict) -> dict:
    """Load a committed checkpoint into ``state`` (in place); returns its ``extra``: ``step``,
    ``sampler`` (from the marker) and ``rng``.

    A checkpoint that is committed but cannot be read (a file missing, truncated or garbled)
    raises ``CheckpointCorrupt``, so that callers can set it aside rather than retry it. Once
    every checksum matched, a failure while reading (no memory, an I/O error) is not the
    checkpoint's fault: it is raised as it is, and the checkpoint is kept where it is.
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    problem = verify(path) or verify_contents(path)
    if problem:
        raise CheckpointCorrupt(str(path), problem)
    info = _marker(path)
    legacy = "sampler" not in info  # written before the marker held the sampler: it is in DCP's extra
    if legacy:
        state = {**state, "extra": {**state["extra"], **_legacy_extra(read_metadata(path))}}
    checksummed = bool(info.get("crc32"))
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        cause = _load_cause(exc)
        if checksummed and isinstance(cause, (OSError, MemoryError, RuntimeError)):
            raise cause from exc
        raise CheckpointCorrupt(str(path), _first_line(cause)) from exc
    extra = state["extra"]
    if legacy:
        return {"step": int(extra["step"]), "sampler": extra["sampler"], "rng": extra["rng"]}
    return {"step": int(info["step"]), "sampler": info["sampler"], "rng": extra["rng"]}


def _load_cause(exc: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (or ``exc`` itself)."""
    return next(iter(_rank_errors(exc).values()), exc)


def _legacy_extra(metadata) -> dict:
    """Placeholders for the non-tensor items of an older checkpoint's ``extra`` (step, sampler, ...),
    shaped as DCP's planner data records them, so that a load fills them in."""
    out: dict = {}
    for fqn, md in metadata.state_dict_metadata.items():
        keys = (metadata.planner_data or {}).get(fqn)
        if not keys or keys[0] != "extra" or not isinstance(md, BytesStorageMetadata):
            continue
        node = out
        for k in keys[1:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = None
    return out


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_contents(path: Path) -> str | None:
    """Check the files' checksums, each rank a share of them (collective when a process group is
    up; all of them in one process); every rank gets the verdict."""
    expected = _marker(path).get("crc32") or {}  # verify() has checked its names
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = []
    for i, (name, crc) in enumerate(sorted(expected.items())):
        if i % world == rank and (path / name).is_file() and _crc32(path / name) != crc:
            problems.append(f"shard {name} does not match its checksum (garbled after it was written)")
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = [p for g in gathered for p in g]
    return problems[0] if problems else None


SET_ASIDE = re.compile(r"\.corrupt\d*$")  # the names set_aside gives


def check_readable(path: str | Path) -> None:
    """Raise ValueError unless ``path`` is a committed checkpoint that was not set aside and whose
    files are whole (sizes, and every checksum the marker records): what a reader (``eval``,
    ``sample``, ``export``) must know before it trusts a tensor of it. Reads every file once."""
    path = Path(path)
    if SET_ASIDE.search(path.name):
        raise ValueError(
            f"checkpoint {path} was set aside as unreadable by the run that found it (its events.jsonl says why); "
            "use another checkpoint"
        )
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker): a save cut short, or no checkpoint")
    problem = verify(path) or verify_contents(path)
    if problem:
        raise ValueError(f"checkpoint {path} is unreadable: {problem}")


class CheckpointCorrupt(RuntimeError):
    """A committed checkpoint that cannot be read; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is unreadable: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # raised in Ray workers, re-raised on the driver: keep the fields
        return (CheckpointCorrupt, (self.path, self.reason))


def verify(path: str | Path) -> str | None:
    """What is wrong with a committed checkpoint's files, or None. Cheap: sizes, not contents.

    DCP's metadata says which file holds each item, at which offset and length; a file that is
    missing or shorter than its items reach is a shard lost or cut short.
    """
    path = Path(path)
    marker = _marker(path)
    if not marker:
        return f"its {MARKER} marker cannot be read as JSON (garbled or cut short)"
    names = marker.get("crc32") or {}
    if not all(isinstance(n, str) and is_plain_name(n) for n in names):
        return f"its {MARKER} marker names a file outside the checkpoint folder"
    expected = names.get(METADATA)
    if expected is not None and (path / METADATA).is_file() and _crc32(path / METADATA) != expected:
        return f"its {METADATA} does not match its checksum (garbled or replaced after it was written); it was not read"
    try:
        metadata = read_metadata(path)
    except Exception as exc:
        return f"its DCP metadata cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            return f"shard {name} is missing"
        if f.stat().st_size < size:
            return f"shard {name} is {f.stat().st_size} bytes, shorter than the {size} its metadata needs"
    return None


def read_info(path: str | Path) -> dict:
    """A checkpoint's step and model configuration (a dict), read without loading its tensors."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    info = json.loads((path / MARKER).read_text())
    if "model_config" not in info:  # written before the marker carried it: read it from DCP
        try:
            extra = {"extra": {"model_config": ""}}
            dcp.load(extra, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
            info["model_config"] = json.loads(extra["extra"]["model_config"])
        except Exception:
            info["model_config"] = None
    return info


def check_model_config(path: str | Path, model_cfg: ModelConfig) -> None:
    """Refuse to resume ``path`` into a model of another architecture, naming every difference."""
    saved = read_info(path).get("model_config")
    if saved is None:
        return  # written before checkpoints recorded it: nothing to compare with
    diffs = architecture_differences(saved, dataclasses.asdict(model_cfg))
    if diffs:
        listed = "; ".join(f"model.{k}: checkpoint {a!r}, job {b!r}" for k, a, b in diffs)
        raise ValueError(
            f"checkpoint {path} was written by a model with another architecture ({listed}); set those keys "
            f"to the checkpoint's values to resume it, or start a new run (another run_dir, resume=false)"
        )


def set_aside(path: str | Path) -> Path:
    """Rename an unreadable checkpoint out of the way (never delete it); returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, target)
    return target
