"""MoELayer: router -> permute -> grouped expert MLPs -> unpermute (+ shared experts).

Legend: T tokens (all leading dims flattened), D model dim, E experts, K experts per token,
R grouped rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_kernels import BACKENDS, permute, unpermute

from .dispatch import ExpertParallel
from .experts import DenseMLP, GroupedExperts, check_activation
from .router import BALANCE_SCOPES, Router, expert_capacity, load_balancing_loss, sequence_balancing_loss, z_loss


@dataclass
class MoEStats:
    """Routing statistics of the layer's last forward pass (detached tensors)."""

    tokens_per_expert: torch.Tensor  # [E] int64: (token, slot) pairs routed to each expert
    dropped_tokens: torch.Tensor  # 0-dim int64: pairs dropped for capacity (0 when dropless)
    load_balancing_loss: torch.Tensor  # 0-dim fp32, unweighted
    z_loss: torch.Tensor  # 0-dim fp32, unweighted


class MoELayer(nn.Module):
    """A token-choice Mixture-of-Experts feed-forward layer.

    ``layer(x)`` maps ``[..., dim]`` to ``[..., dim]``. After each call:

    - ``layer.aux_loss`` is the weighted sum ``aux_loss_coef * balancing + z_loss_coef * z``, a
      differentiable 0-dim tensor for the model to add to its loss;
    - ``layer.stats`` is a ``MoEStats`` with tokens per expert and dropped tokens, for loggers.

    Args:
        dim: model (input and output) size.
        hidden_dim: hidden size of each expert MLP.
        num_experts: number of routed experts E.
        top_k: experts per token K (1 <= K <= E).
        activation: "swiglu" (gate and up projections) or "gelu".
        router: "softmax" or "sigmoid" scores.
        capacity_factor: None for dropless; a number c caps each expert at
            ``ceil(c * T * K / E)`` rows. Overflow slots are dropped (they add zero to the output)
            in this order: second choices before first choices, and later tokens before earlier
            ones; i.e. an expert keeps all first-choice slots in token order, then second choices.
        shared_experts: number of shared experts; they form one dense MLP of width
            ``shared_experts * hidden_dim`` that every token passes through.
        normalize_weights: renormalise the top-k gate weights to sum to 1. Default: True for
            K > 1 (Mixtral, DeepSeek), False for K = 1 (Switch; normalising would make it 1).
        aux_loss_coef: weight of the load-balancing loss in ``aux_loss``.
        z_loss_coef: weight of the router z-loss in ``aux_loss``.
        expert_bias: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the
            choice scores, moved by ``update_expert_bias``.
        backend: "auto" (Triton on CUDA, eager on CPU), "triton" or "torch".
        balance_scope: the balancing loss's expert shares: "micro_batch" (the layer's tokens, over
            all data-parallel ranks), or "sequence" (each sequence of a [B, S, D] input on its
            own: the same objective however the batch is split; a 2-D input is one micro-batch).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "swiglu",
        router: str = "softmax",
        capacity_factor: float | None = None,
        shared_experts: int = 0,
        normalize_weights: bool | None = None,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        expert_bias: bool = False,
        backend: str = "auto",
        balance_scope: str = "micro_batch",
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; lower top_k or add experts")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {capacity_factor!r}")
        if shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0, got {shared_experts}")
        if aux_loss_coef < 0 or z_loss_coef < 0:
            raise ValueError("aux_loss_coef and z_loss_coef must be >= 0")
        if balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope={balance_scope!r} is unknown; use one of {', '.join(BALANCE_SCOPES)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        check_activation(activation)
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.backend, self.balance_scope = backend, balance_scope
        if normalize_weights is None:
            normalize_weights = top_k > 1
        self.router = Router(
            dim, num_experts, top_k, score=router, normalize_weights=normalize_weights, expert_bias=expert_bias
        )
        self.experts = GroupedExperts(num_experts, dim, hidden_dim, activation)
        self.shared = DenseMLP(dim, shared_experts * hidden_dim, activation) if shared_experts else None
        self.aux_loss: torch.Tensor | None = None
        self.stats: MoEStats | None = None
        # Set from outside by moe_cluster.parallel.apply_expert_parallel; None on one device.
        # With it, self.experts holds only this rank's slice of the experts.
        self.parallel: ExpertParallel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, but the layer was built with dim={self.dim}")
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        routing = self.router(x_TD)
        capacity = expert_capacity(self.capacity_factor, T, self.top_k, self.num_experts)
        if torch.is_autocast_enabled(x_TD.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))  # the experts' compute dtype
        if self.parallel is None or self.parallel.ep_size == 1:
            y_TD, plan = self.experts.routed(
                x_TD, routing.expert_TK, routing.weight_TK, capacity=capacity, backend=self.backend
            )
        else:
            x_RD, plan = permute(x_TD, routing.expert_TK, self.num_experts, capacity, backend=self.backend)
            out_RD = self.parallel.run_experts(x_RD, plan.counts_E, self.experts, plan.backend)
            y_TD = unpermute(out_RD, routing.weight_TK.to(out_RD.dtype), plan)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        self._record_losses(routing, plan, x.shape[:-1])
        return y_TD.view(x.shape)

    def _record_losses(self, routing, plan, batch_shape) -> None:
        routed_E, dropped = plan.routed_E, plan.dropped
        if self.parallel is not None:
            # The balancing loss uses the whole global batch's expert shares, so that the mean of
            # the ranks' losses equals the loss of one process holding the whole batch.
            routed_E = self.parallel.global_counts(routed_E)
            dropped = self.parallel.global_counts(dropped.view(1))[0]
        if self.balance_scope == "sequence" and len(batch_shape) == 2:
            B, S = batch_shape  # each sequence's own shares: the same whatever the batch's layout
            E, K = self.num_experts, self.top_k
            lb = sequence_balancing_loss(routing.probs_TE.view(B, S, E), routing.expert_TK.view(B, S, K))
        else:
            T = routing.probs_TE.shape[0] * (1 if self.parallel is None else self.parallel.data_world_size)
            lb = load_balancing_loss(routing.probs_TE, routed_E, self.top_k, num_tokens=T)
        z = z_loss(routing.logits_TE)
        self.aux_loss = self.aux_loss_coef * lb + self.z_loss_coef * z
        self.stats = MoEStats(routed_E.detach(), dropped.detach(), lb.detach(), z.detach())

    def update_expert_bias(self, tokens_per_expert: torch.Tensor, rate: float = 1e-3) -> None:
        """Auxiliary-loss-free balancing step; see ``Router.update_expert_bias``."""
        self.router.update_expert_bias(tokens_per_expert, rate)
