"""The model's parameter tensors, as the model itself builds them.

``model_params(m)`` builds ``Transformer(m)`` on the meta device (shapes, no memory) and lists
its ``named_parameters()`` as the planner's records: the name less its block and module prefix,
the FSDP unit that holds it, and the shape. What the model holds is what the planner counts:
there is no second description of the model to keep in step with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..model import ModelConfig, Transformer
from ..moe import GroupedExperts


@dataclass(frozen=True)
class Param:
    """One parameter tensor of the unsharded model."""

    name: str  # as in named_parameters, less the block prefix: "wqkv", "router", "w_up", ...
    unit: str  # its FSDP unit: "root", "block.<i>", or "experts.<i>" (a MoE layer's stacked experts)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def expert(self) -> bool:
        return self.unit.startswith("experts.")


# Every model config planned in this process -> its tensors. A meta-device build takes tens of
# milliseconds, and the suggestions re-plan one model a hundred times and more.
_BUILT: dict[tuple, tuple[Param, ...]] = {}


def model_params(m: ModelConfig) -> list[Param]:
    """Every parameter tensor of ``Transformer(m)``, as ``named_parameters`` lists them (a tied
    head shares the embedding's tensor, so it is not listed)."""
    key = dataclasses.astuple(m)  # every field, the nested MoE config's too
    if key not in _BUILT:
        with torch.device("meta"):
            model = Transformer(m)
        experts = {name for name, module in model.named_modules() if isinstance(module, GroupedExperts)}
        _BUILT[key] = tuple(_param(name, tuple(p.shape), experts) for name, p in model.named_parameters())
    return list(_BUILT[key])


def _param(name: str, shape: tuple[int, ...], experts: set[str]) -> Param:
    """``blocks.3.ffn.experts.w_up`` -> ("w_up", "experts.3"); ``blocks.3.attn.wqkv.weight`` ->
    ("wqkv", "block.3"); ``blocks.3.ffn.shared.up.weight`` -> ("shared.up", "block.3");
    ``embed.weight`` -> ("embed", "root")."""
    module, _, leaf = name.rpartition(".")
    parts = name.split(".")[:-1] if leaf == "weight" else name.split(".")
    if parts[0] != "blocks":
        return Param(".".join(parts), "root", shape)
    i, rest = parts[1], parts[2:]
    if rest[0] in ("attn", "ffn"):  # the block's attention and feed-forward modules
        rest = rest[1:]
    if module in experts:
        return Param(".".join(rest[1:]), f"experts.{i}", shape)  # less the "experts" module itself
    return Param(".".join(rest), f"block.{i}", shape)
