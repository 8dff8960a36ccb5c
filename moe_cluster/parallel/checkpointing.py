"""Activation checkpointing, applied to a single-device model from outside.

``model.activation_checkpointing`` decides what each transformer block keeps from its forward
for its backward:

- ``none``: everything autograd saves.
- ``full``: the block's input only; the whole block runs again in backward (one more forward
  of every block, expert-parallel all-to-alls included).
- ``selective``: the outputs of the matmuls (projections, attention, router, expert GEMMs) and
  of the expert-parallel collectives; norms, RoPE, activations, softmax, top-k and permutations
  are recomputed (torchtitan's per-op policy). The recompute communicates nothing and skips the
  kept GEMMs; GEMMs the policy cannot keep run again: Triton's (GPU; not dispatcher ops) and the
  eager path's small ones written into a preallocated buffer (``torch.mm(out=)``, EP rows mode).

Each ``Block`` runs its body as ``checkpoint(body, ..., use_reentrant=False, context_fn=...)``
through an attribute set here, not inside a wrapper module: parameter names, which checkpoints
and FSDP key on, stay as they are (torch's ``checkpoint_wrapper`` would add
``_checkpoint_wrapped_module.``). Apply it before FSDP's ``fully_shard``, as torchtitan does.

Running a block's forward twice, and why that stays correct:

- Collectives. ``selective`` keeps the outputs of the all-to-alls (rows and counts) and of the
  counts' all-reduce (``moe.dispatch`` uses the functional, out-of-place ops so they can be
  kept), so a recompute never communicates; the ``.tolist()`` of the counts reads kept values.
  ``full`` communicates again: every rank recomputes the same blocks in the same order (the
  backward graph has the same structure on every rank), so the collectives still pair up.
- ``layer.aux_loss`` and ``layer.stats`` are assigned, never accumulated: a recompute, if it
  gets that far, writes the same values again. The loss read them right after the forward; the
  balancing loss's gradient flows through the first forward's graph, whose saved tensors the
  recompute restores.
- The expert-bias buffer changes only after the optimizer step, so the recompute routes every
  token as the forward did. ``GradientBuffers`` are used by backward only.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..model.config import ACTIVATION_CHECKPOINTING as MODES
from ..model.transformer import Block


def _ops(*names: str) -> frozenset:
    """The named op overloads that this torch build has (e.g. cuDNN attention is newer than 2.4)."""
    found = set()
    for name in names:
        namespace, op, overload = name.split(".")
        try:
            found.add(getattr(getattr(getattr(torch.ops, namespace), op), overload))
        except (AttributeError, RuntimeError):  # an op namespace raises RuntimeError on unknown names
            pass
    return frozenset(found)


# Outputs kept by ``selective``. Only out-of-place overloads: the policy caches an op's return
# value and skips the op in the recompute, so an ``.out`` or in-place op would leave its buffer
# unfilled (and a kept output changed later in the forward is refused by torch).
SAVE_OPS = _ops(
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten.linear.default",
    "mkldnn._linear_pointwise.default",  # moe_kernels.cpu_gemm's oneDNN GEMMs (large fp32, CPU)
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "_c10d_functional.all_to_all_single.default",  # the EP rows and counts
    "_c10d_functional.all_reduce.default",  # the global expert counts of the balancing loss
)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    # A new cache per block call: the forward fills it, that block's recompute empties it.
    return create_selective_checkpoint_contexts(_policy)


def _run_checkpointed(body, *inputs, selective: bool):
    if not torch.is_grad_enabled():  # evaluation: autograd saves nothing anyway
        return body(*inputs)
    if selective:
        return checkpoint(body, *inputs, use_reentrant=False, context_fn=_selective_contexts)
    return checkpoint(body, *inputs, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Make every transformer block of ``model`` checkpoint its activations (in place)."""
    if mode not in MODES:
        raise ValueError(f"model.activation_checkpointing={mode!r} is unknown; use one of: {', '.join(MODES)}")
    run = None if mode == "none" else functools.partial(_run_checkpointed, selective=mode == "selective")
    for block in model.modules():
        if isinstance(block, Block):
            block.checkpoint_fn = run


def _storages(tree) -> dict[int, torch.UntypedStorage]:
    return {t.untyped_storage()._cdata: t.untyped_storage() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


class _StorageRecorder(TorchDispatchMode):
    """Holds every storage an op allocates (not the views and in-place results of its inputs'
    storages, e.g. a parameter's slice), once per storage."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, torch.UntypedStorage] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _storages((args, kwargs))
        for key, storage in _storages(out).items():
            if key not in inputs:
                self.storages.setdefault(key, storage)
        return out


def kept_activation_bytes(forward) -> tuple[object, int]:
    """``(forward(), bytes)``: the bytes of the tensors made during ``forward()`` that are still
    alive when it returns (each storage once), i.e. what the graph keeps for backward.

    Counted by liveness rather than with an outer ``saved_tensors_hooks``: checkpointing's own
    hooks hide the tensors saved inside a block from an outer hook, while what it keeps instead
    (the block inputs, selective checkpointing's cache) is held outside any hook. Every storage
    made during the call is held until the end, so the call's peak memory is not the real one.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        raise RuntimeError("kept_activation_bytes needs torch._C._storage_Use_Count, absent from this torch build")
    recorder = _StorageRecorder()
    with recorder:
        result = forward()
    # A storage whose only owner is the recorder was freed by everyone else.
    kept = sum(s.nbytes() for s in recorder.storages.values() if use_count(s._cdata) > 1)
    return result, kept
