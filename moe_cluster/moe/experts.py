"""Expert feed-forward networks, stacked along a leading expert dimension.

The weights are ``[E, in, out]`` tensors, so a checkpoint slices by expert index and expert
parallelism shards along dim 0. The grouped rows come from ``moe_kernels.permute``: contiguous
groups, one per expert, in expert order.

Legend: R grouped rows, E experts, D model dim, H expert hidden dim.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kernels import GradientBuffers, activation_forward, check_activation, expert_mlp, moe_mlp


class GroupedExperts(nn.Module):
    """E independent MLPs (SwiGLU or GELU, no biases) applied to grouped rows."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu"):
        super().__init__()
        check_activation(activation)
        self.activation = activation
        up_dim = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w_up = nn.Parameter(torch.empty(num_experts, dim, up_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.grad_buffers = GradientBuffers()  # CPU: weight gradients reuse last step's memory
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_up, std=self.w_up.shape[1] ** -0.5)
        nn.init.normal_(self.w_down, std=self.w_down.shape[1] ** -0.5)

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights in the compute dtype: under autocast its dtype (custom autograd ops are not
        autocast); under FSDP mixed precision they arrive in it already."""
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return self.w_up, self.w_down
        dtype = torch.get_autocast_dtype(device)
        return self.w_up.to(dtype), self.w_down.to(dtype)

    def forward(self, x_RD, counts_E, *, padded: bool, backend: str) -> torch.Tensor:
        """Grouped rows in, grouped rows out (the rows of each expert contiguous, in expert order).

        The weights are read here, inside the module's call, and nowhere else: a sharding wrapper
        (FSDP) gathers them around this call and reduces their gradients after its backward.
        """
        w_up, w_down = self._weights(x_RD)
        return expert_mlp(
            x_RD, w_up, w_down, counts_E, self.activation, padded=padded, backend=backend, grad_buffers=self.grad_buffers
        )

    def routed(self, x_TD, expert_TK, weight_TK, *, capacity: int | None, backend: str):
        """Route, run and combine in one call (``moe_mlp``, fused on the eager backend): every
        expert is local. Returns ``(y_TD, plan)``. FSDP treats this method as a forward too
        (``register_fsdp_forward_method``)."""
        w_up, w_down = self._weights(x_TD)
        return moe_mlp(
            x_TD, expert_TK, weight_TK.to(w_up.dtype), w_up, w_down, self.activation,
            capacity=capacity, backend=backend, grad_buffers=self.grad_buffers,
        )  # fmt: skip


class DenseMLP(nn.Module):
    """One dense MLP with the experts' activation: the shared experts (DeepSeek-style)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu"):
        super().__init__()
        check_activation(activation)
        self.activation = activation
        up_dim = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.up = nn.Linear(dim, up_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down(activation_forward(self.up(x_TD), self.activation))
