"""Token-choice top-k router and its auxiliary losses.

Legend: T tokens, D model dim, E experts, K experts chosen per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_kernels.cpu_gemm import linear

SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass
class Routing:
    """What the router decided for one batch of tokens."""

    expert_TK: torch.Tensor  # int64 expert chosen for each (token, slot)
    weight_TK: torch.Tensor  # gate weight of each (token, slot), fp32 (fp64 for fp64 input)
    logits_TE: torch.Tensor  # router logits, same dtype (the z-loss reads them)
    probs_TE: torch.Tensor  # scores normalised over experts (the balancing loss reads them)


class Router(nn.Module):
    """Scores every expert for every token and keeps the top k.

    The router runs in fp32 whatever the input dtype: the top-k choice and the gate weights are
    sensitive to rounding, and the [T, E] matmul is a small share of the layer's work.

    With ``expert_bias`` (auxiliary-loss-free balancing, DeepSeek-V3) a per-expert bias is added
    to the scores for the top-k choice only; the gate weights come from the unbiased scores.
    ``update_expert_bias`` moves the bias towards balance after each optimizer step.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score: str = "softmax",
        normalize_weights: bool = True,
        expert_bias: bool = False,
    ):
        super().__init__()
        if score not in SCORE_FUNCTIONS:
            raise ValueError(f"router={score!r} is unknown; use one of {', '.join(SCORE_FUNCTIONS)}")
        self.num_experts, self.top_k, self.score = num_experts, top_k, score
        self.normalize_weights = normalize_weights
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # fp32, or fp64 for gradchecks
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = linear(x_TD.to(dtype), self.weight.to(dtype))
            if self.score == "softmax":
                scores_TE = torch.softmax(logits_TE, dim=-1)
                probs_TE = scores_TE
            else:
                scores_TE = torch.sigmoid(logits_TE)
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
            choice_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
            expert_TK = torch.topk(choice_TE, self.top_k, dim=-1, sorted=True).indices
            weight_TK = scores_TE.gather(1, expert_TK)
            if self.normalize_weights:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        return Routing(expert_TK, weight_TK, logits_TE, probs_TE)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones by ``rate``.

        Pass the counts summed over every data-parallel rank, so that all replicas move alike.
        """
        if self.expert_bias is None:
            raise ValueError("update_expert_bias needs a router built with expert_bias=True")
        load_E = tokens_per_expert_E.to(self.expert_bias)
        self.expert_bias += rate * torch.sign(load_E.mean() - load_E)


# Over which tokens the balancing loss takes its expert shares: each micro-batch of the global
# batch (over all data-parallel ranks), or each sequence on its own (invariant to the layout).
BALANCE_SCOPES = ("micro_batch", "sequence")


def load_balancing_loss(
    probs_TE: torch.Tensor, routed_E: torch.Tensor, top_k: int, num_tokens: int | None = None
) -> torch.Tensor:
    """Switch/GShard balancing loss ``E * sum_e f_e * P_e``.

    f_e is the share of the T*K slots routed to expert e (before any capacity drop) and P_e the
    mean router probability of e. It is 1.0 for perfectly uniform routing, E for total collapse.
    ``routed_E`` may count a larger batch than ``probs_TE`` (all data-parallel ranks); pass that
    batch's ``num_tokens`` then.
    """
    T, E = probs_TE.shape
    f_E = routed_E.to(probs_TE.dtype) / ((num_tokens or T) * top_k)
    return E * torch.dot(f_E, probs_TE.mean(0))


def sequence_balancing_loss(probs_BSE: torch.Tensor, expert_BSK: torch.Tensor) -> torch.Tensor:
    """The balancing loss of each sequence on its own, averaged over sequences (DeepSeek-V3's
    sequence-wise balance loss, in the Switch form ``E * sum_e f_e * P_e`` per sequence).

    A sequence is never split between ranks or micro-batches, so the loss, and its gradient
    averaged over the global batch, are the same however the batch is laid out; the per-batch
    form's shares f_e depend on which sequences share a micro-batch.
    """
    B, S, E = probs_BSE.shape
    K = expert_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, device=probs_BSE.device, dtype=probs_BSE.dtype)
    counts_BE.scatter_add_(1, expert_BSK.reshape(B, S * K), torch.ones(B, S * K, device=probs_BSE.device,
                                                                         dtype=probs_BSE.dtype))  # fmt: skip
    f_BE = counts_BE / (S * K)
    return E * (f_BE * probs_BSE.mean(1)).sum(-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, keeps the logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def expert_capacity(capacity_factor: float | None, num_tokens: int, top_k: int, num_experts: int) -> int | None:
    """Rows each expert may take: ``ceil(capacity_factor * T * K / E)``; None is dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)
