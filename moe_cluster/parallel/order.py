"""Every kind of parallelism, applied to a single-device Transformer in one fixed order.

``parallelize`` takes the model as built on the meta device (no memory yet) and, in place:

1. ``apply_expert_parallel``: each MoE layer keeps only this rank's slice of the experts. First,
   while the model is still on meta: materialising then allocates only this rank's experts, never
   all of them.
2. ``apply_activation_checkpointing``: each block's forward runs through ``checkpoint``. Before
   FSDP wraps the blocks, as torchtitan does: the modules ``fully_shard`` wraps must be the final
   ones (torch's ``checkpoint_wrapper`` replaces them; ours only sets an attribute on each block,
   so names stay, but keeps the order so that a wrapper could replace it).
3. Materialise: ``to_empty`` on ``device``, then the caller's ``init_weights(model, experts)``
   (the seeded init, and any starting weights such as a Hugging Face checkpoint), given the
   global indices of the experts this rank holds.
4. ``apply_fsdp``, when the layout shards (``layout.fsdp``: the native engine on more than one
   rank). After the weights are set, so that they are the unsharded model's whatever the layout
   (a 1-rank run and an 8-rank run start from the same values): each rank keeps its shard of
   them and frees the rest. ``Transformer.init_weights`` and the weight loaders write whole
   tensors (and whole experts of this rank's slice), which FSDP's DTensor shards are not.

The optimizer is built after this, on the parameters as they are now (FSDP's DTensors).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .apply import apply_expert_parallel
from .checkpointing import apply_activation_checkpointing
from .fsdp import apply_fsdp
from .mesh import ProcessGroups


def parallelize(
    model: nn.Module,
    groups: ProcessGroups,
    *,
    activation_checkpointing: str,
    init_weights: Callable[[nn.Module, range], None],
    device: str | torch.device,
) -> None:
    """Apply expert parallelism, activation checkpointing, materialisation and FSDP to ``model``
    (in place), in the module doc's order. The layout is ``groups.layout``, the one the groups
    were built from. Collective when the layout shards: every rank calls it.

    ``activation_checkpointing``: ``model.activation_checkpointing`` (none, full, selective).
    ``init_weights(model, experts)``: sets every weight of the materialised, unsharded model;
    its stacked expert tensors hold the global ``experts`` (``layout.local_experts(rank)``).
    """
    layout = groups.layout
    apply_expert_parallel(model, groups)
    apply_activation_checkpointing(model, activation_checkpointing)
    model.to_empty(device=torch.device(device))
    init_weights(model, layout.local_experts(groups.rank))
    if layout.fsdp:
        apply_fsdp(model, groups)
