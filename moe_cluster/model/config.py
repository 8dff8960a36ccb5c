"""Model configuration and presets.

Plain dataclasses of numbers and strings: they serialise, and Hydra's structured configs mirror
them. The model sees only these.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace


# Values of ModelConfig.activation_checkpointing (moe_cluster.parallel.checkpointing applies them).
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")

# A rule table row: (full key, value, whether it is in range, the range in words).
Rule = tuple[str, object, bool, str]


def raise_first_failure(rules: Iterable[Rule]) -> None:
    """Raise ``ValueError("KEY must be RULE, got VALUE")`` for the first row out of range.

    Write each row's ``ok`` as the range itself (``x > 0``, not ``not x <= 0``): every comparison
    with NaN is false, so a NaN fails every range.
    """
    for key, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"{key} must be {rule}, got {value!r}")


def is_bool(value, optional: bool = False) -> bool:
    """Hydra enforces the type of a composed config; a config built in Python is checked here."""
    return isinstance(value, bool) or (optional and value is None)


@dataclass
class MoEConfig:
    num_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts per token
    hidden_dim: int = 256  # hidden size of each expert MLP
    activation: str = "swiglu"  # "swiglu" or "gelu"
    router: str = "softmax"  # "softmax" or "sigmoid" scores
    capacity_factor: float | None = None  # None: dropless
    shared_experts: int = 0  # shared experts (one dense MLP of width shared_experts * hidden_dim)
    normalize_weights: bool | None = None  # renormalise top-k weights; None: True when top_k > 1
    aux_loss_coef: float = 0.01  # load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight
    expert_bias: bool = False  # auxiliary-loss-free balancing bias (DeepSeek-V3)
    bias_update_rate: float = 1e-3  # step of the expert-bias update per optimizer step
    backend: str = "auto"  # kernel backend: "auto", "triton" or "torch"
    # The balancing loss's expert shares: over each "micro_batch" (all data-parallel ranks), or
    # each "sequence" (DeepSeek-V3's sequence-wise loss: the same objective at any layout).
    balance_scope: str = "micro_batch"

    def validate(self, prefix: str = "model.moe") -> None:
        """Ranges; the choices (activation, router, backend) are checked where their registries
        live (moe_cluster.config), which this torch-free module does not import."""
        e, k, cf = self.num_experts, self.top_k, self.capacity_factor
        raise_first_failure([
            # num_experts first: the planner divides by it.
            (f"{prefix}.num_experts", e, e >= 1, ">= 1"),
            (f"{prefix}.top_k", k, k >= 1, ">= 1"),
            (f"{prefix}.hidden_dim", self.hidden_dim, self.hidden_dim >= 1, ">= 1"),
            (f"{prefix}.capacity_factor", cf, cf is None or 0 < cf < math.inf, "> 0 and finite (or null: dropless)"),
            (f"{prefix}.shared_experts", self.shared_experts, self.shared_experts >= 0, ">= 0"),
            (f"{prefix}.normalize_weights", self.normalize_weights, is_bool(self.normalize_weights, optional=True),
             "true, false or null"),
            (f"{prefix}.aux_loss_coef", self.aux_loss_coef, 0 <= self.aux_loss_coef < math.inf, "finite and >= 0"),
            (f"{prefix}.z_loss_coef", self.z_loss_coef, 0 <= self.z_loss_coef < math.inf, "finite and >= 0"),
            (f"{prefix}.expert_bias", self.expert_bias, is_bool(self.expert_bias), "true or false"),
            # 0 freezes the bias at zero: allowed, as aux_loss_coef=0 is.
            (f"{prefix}.bias_update_rate", self.bias_update_rate, 0 <= self.bias_update_rate < math.inf,
             "finite and >= 0"),
        ])  # fmt: skip
        if k > e:
            raise ValueError(f"{prefix}.top_k={k} exceeds {prefix}.num_experts={e}; lower top_k or add experts")


@dataclass
class ModelConfig:
    vocab_size: int | None = 256  # byte-level by default; None: the data's (data=bin's default, set by config.assemble)
    dim: int = 128  # model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None: n_heads
    max_seq_len: int = 256  # longest sequence the RoPE tables cover
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the embedding and LM-head weights
    moe_every: int = 1  # an MoE feed-forward every k-th block (others dense)
    first_dense_layers: int = 0  # the first n blocks use dense feed-forwards
    dense_hidden_dim: int = 512  # hidden size of the dense feed-forwards
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    init_from: str | None = None  # "hf:PATH": start from a Mixtral-format directory (its config sets the architecture)
    activation_checkpointing: str = "none"  # what blocks keep for backward: "none", "full" or "selective"
    moe: MoEConfig = field(default_factory=MoEConfig)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense_layers and (i - self.first_dense_layers) % self.moe_every == 0

    def validate(self) -> None:
        """Every field's range, then how the fields fit together (ranges first: those divide)."""
        v, kv, seq = self.vocab_size, self.n_kv_heads, self.max_seq_len
        raise_first_failure([
            # None: taken from the data when the job is assembled (moe_cluster.config.assemble).
            ("model.vocab_size", v, v is None or v >= 1, ">= 1 (or null: the data's)"),
            ("model.dim", self.dim, self.dim >= 1, ">= 1"),
            ("model.n_layers", self.n_layers, self.n_layers >= 1, ">= 1"),
            ("model.n_heads", self.n_heads, self.n_heads >= 1, ">= 1"),
            ("model.n_kv_heads", kv, kv is None or kv >= 1, ">= 1 (or null: model.n_heads)"),
            ("model.max_seq_len", seq, seq >= 1, ">= 1"),
            ("model.rope_theta", self.rope_theta, 0 < self.rope_theta < math.inf, "finite and > 0"),
            ("model.norm_eps", self.norm_eps, 0 < self.norm_eps < math.inf, "finite and > 0"),
            ("model.tie_embeddings", self.tie_embeddings, is_bool(self.tie_embeddings), "true or false"),
            ("model.moe_every", self.moe_every, self.moe_every >= 1, ">= 1"),
            # >= n_layers is a dense model: allowed (is_moe_layer is then false everywhere).
            ("model.first_dense_layers", self.first_dense_layers, self.first_dense_layers >= 0, ">= 0"),
            ("model.dense_hidden_dim", self.dense_hidden_dim, self.dense_hidden_dim >= 1, ">= 1"),
            # 0 would start every weight equal, and symmetric weights never tell apart.
            ("model.init_std", self.init_std, 0 < self.init_std < math.inf, "finite and > 0"),
        ])  # fmt: skip
        self.moe.validate()
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if kv is not None and self.n_heads % kv:
            raise ValueError(f"model.n_kv_heads={kv} must divide model.n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size {self.dim // self.n_heads} must be even for RoPE; change model.n_heads")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"model.activation_checkpointing={self.activation_checkpointing!r} is unknown; "
                f"use one of: {', '.join(ACTIVATION_CHECKPOINTING)}"
            )


PRESETS: dict[str, ModelConfig] = {
    # Trains on two CPU cores in minutes.
    "tiny": ModelConfig(
        dim=128, n_layers=4, n_heads=4, max_seq_len=256, dense_hidden_dim=512,
        moe=MoEConfig(num_experts=8, top_k=2, hidden_dim=256),
    ),
    "small": ModelConfig(
        dim=512, n_layers=8, n_heads=8, max_seq_len=1024, dense_hidden_dim=2048,
        moe=MoEConfig(num_experts=16, top_k=2, hidden_dim=1024),
    ),
    # Mixtral-style: 8 SwiGLU experts, top-2, softmax router with renormalised weights.
    "mixtral": ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=4096, rope_theta=1e6,
        tie_embeddings=False, dense_hidden_dim=14336,
        moe=MoEConfig(num_experts=8, top_k=2, hidden_dim=14336, z_loss_coef=0.0),
    ),
    # DeepSeek-style fine-grained experts: many small experts, top-6, shared experts, sigmoid
    # router with auxiliary-loss-free bias, first block dense.
    "deepseek": ModelConfig(
        vocab_size=32000, dim=2048, n_layers=28, n_heads=16, max_seq_len=4096, tie_embeddings=False,
        first_dense_layers=1, dense_hidden_dim=10944,
        moe=MoEConfig(
            num_experts=64, top_k=6, hidden_dim=1408, router="sigmoid", shared_experts=2,
            expert_bias=True, aux_loss_coef=0.0001, z_loss_coef=0.0,
        ),
    ),
}  # fmt: skip


# Keys a resumed run may change: they set how the model starts or is trained, not what it is.
TRAINING_ONLY_KEYS = frozenset(
    {"init_from", "init_std", "activation_checkpointing", "moe.backend", "moe.aux_loss_coef", "moe.z_loss_coef",
     "moe.bias_update_rate", "moe.balance_scope"}
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def architecture_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every architecture key on which two configs differ.

    Both are ``dataclasses.asdict`` of a ModelConfig; keys in ``TRAINING_ONLY_KEYS`` are ignored.
    A key one side lacks (a config from another version) counts as a difference.
    """
    a, b = _flat(saved), _flat(current)
    missing = "(absent)"
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(a.keys() | b.keys())
        if k not in TRAINING_ONLY_KEYS and a.get(k, missing) != b.get(k, missing)
    ]


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of a preset, with top-level fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)
