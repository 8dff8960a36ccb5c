"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, re-shardable.

Layout: ``<dir>/step_00000100/`` holds DCP's files and, once complete, a ``COMMITTED`` marker.
A checkpoint without the marker (a save cut short) is never loaded, and is removed by the next
save. Only the newest ``keep`` complete checkpoints are kept.

Expert weights and their optimizer state are stored one key per global expert
(``blocks.0.ffn.experts.w_up.e5``), so a checkpoint written with one EP size loads onto any
other: each rank asks for the experts it holds. Replicated tensors (dense weights, or an expert
held by several expert-data-parallel ranks) are written once by DCP's planner.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..parallel import ProcessGroups, is_expert_param

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _expand(name: str, tensor: torch.Tensor, local: range, expert: bool) -> dict[str, torch.Tensor]:
    """One entry, or one per global expert (views into the local slice) for expert tensors."""
    if not expert:
        return {name: tensor}
    return {f"{name}.e{e}": tensor[i] for i, e in enumerate(local)}


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

    ``optim_state`` maps each parameter name to its ``exp_avg``, ``exp_avg_sq`` and ``step``.
    """
    local = groups.layout.local_experts(groups.rank)
    model_state, flat_optim = {}, {}
    for name, p in model.named_parameters():
        model_state.update(_expand(name, p.data, local, is_expert_param(name)))
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    for name, buf in model.named_buffers():
        if name not in non_persistent:  # e.g. the routers' expert bias (auxiliary-loss-free balancing)
            model_state[name] = buf
    for name, state in optim_state.items():
        expert = is_expert_param(name)
        for key in ("exp_avg", "exp_avg_sq"):
            flat_optim.update(_expand(f"{name}.{key}", state[key], local, expert))
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


def save(root: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step``; collective over all ranks."""
    path = step_dir(root, step)
    if _is_rank0():
        # This step's directory and any later ones belong to a timeline abandoned by a failure
        # (a save cut short, or checkpoints past the point the run resumed from).
        _remove_from(Path(root), step)
        path.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(path))
    _barrier()  # every rank has written its shards and DCP its metadata
    if _is_rank0():
        tmp = path / f".{MARKER}.tmp"
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, path / MARKER)  # atomic: the checkpoint exists from here on
        _prune(Path(root), keep)
    _barrier()
    return path


def _remove_from(root: Path, step: int) -> None:
    if not root.is_dir():
        return
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and int(m.group(1)) >= step:
            shutil.rmtree(d)


def _prune(root: Path, keep: int) -> None:
    complete = complete_checkpoints(root)
    newest = complete[-1][0] if complete else -1
    for s, d in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.iterdir():  # partial checkpoints older than the newest complete one
        m = _STEP_DIR.match(d.name)
        if m and not (d / MARKER).is_file() and int(m.group(1)) < newest:
            shutil.rmtree(d, ignore_errors=True)


def load(path: str | Path, state: dict) -> dict:
    """Load a committed checkpoint into ``state`` (in place); returns its ``extra`` entry."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    dcp.load(state, checkpoint_id=str(path))
    return state["extra"]
