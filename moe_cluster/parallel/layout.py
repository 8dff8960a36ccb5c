"""The job's parallel layout: one value, validated here, built once where the job is assembled.

Every part of the service reads the same ``Layout``: the memory planner, the controller's
policies (which derive smaller or larger layouts from it when workers are lost or come back), the
placement, each worker, and the Trainer with its process groups. The divisibility rules and the
FSDP on/off rule are written here and nowhere else. Plain integers and no torch: the driver and
``moe-cluster plan`` use it on machines without a GPU stack.

Ranks are laid out EP-major: EP group g holds ranks [g*ep, (g+1)*ep); rank r owns the expert
slice ``ep_rank = r % ep``. Every rank reads its own slice of the global batch (data parallel
over the whole world). The ranks that hold the same expert slice, {r : r % ep == i}, form that
slice's expert-data-parallel group.

    world=4, ep=2:   EP groups {0,1} {2,3}    expert-DP groups {0,2} {1,3}

``islands`` leaves room for groups of ranks that synchronise among themselves every step and
with each other rarely; today a layout is one island.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ENGINES = ("native", "deepspeed")


def fsdp_wanted(fsdp: bool | None, engine: str) -> bool:
    """``parallel.fsdp`` as ``engine`` resolves it: None is on for the native engine; DeepSpeed
    shards with ZeRO instead, so FSDP set on with it is a mistake."""
    if engine not in ENGINES:
        raise ValueError(f"trainer.engine={engine!r} is unknown; use one of: {', '.join(ENGINES)}")
    if engine == "deepspeed":
        if fsdp:
            raise ValueError(
                "parallel.fsdp=true shards the native engine's state; trainer.engine=deepspeed shards with ZeRO "
                "(the deepspeed section): set parallel.fsdp=false (or leave it unset), or trainer.engine=native"
            )
        return False
    return fsdp is None or bool(fsdp)


@dataclass(frozen=True)
class Layout:
    """``world`` ranks in EP groups of ``ep``, each stepping on ``grad_accum`` micro-batches.

    The global batch is the same in every layout of a job (a heal that shrinks the world raises
    ``grad_accum`` instead), so ``micro_batch`` never grows past the configured one.
    """

    world: int  # ranks
    ep: int  # expert-parallel size
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    num_experts: int = field(default=1, kw_only=True)  # experts of each MoE layer
    global_batch_size: int | None = field(default=None, kw_only=True)  # sequences per step; None: not checked
    # parallel.fsdp as the engine resolves it (``fsdp_wanted``); the state is sharded when this
    # holds and there is more than one rank (``fsdp``): one rank never shards.
    shard: bool = field(default=False, kw_only=True)
    islands: int = field(default=1, kw_only=True)

    def __post_init__(self):
        for name in ("world", "ep", "grad_accum", "num_experts", "islands"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layout {name} must be an integer >= 1, got {value!r}")
        # Named by the keys a user sets: a layout the controller derives (a heal) is valid by construction.
        if self.num_experts % self.ep:
            raise ValueError(
                f"model.moe.num_experts={self.num_experts} is not divisible by parallel.ep={self.ep}; "
                f"set parallel.ep to a divisor of {self.num_experts}"
            )
        if self.ep > self.world:
            raise ValueError(
                f"parallel.ep={self.ep} is larger than cluster.num_workers={self.world}; "
                f"lower parallel.ep or raise cluster.num_workers"
            )
        if self.world % self.ep:
            lower, higher = self.world - self.world % self.ep, self.world + self.ep - self.world % self.ep
            raise ValueError(
                f"cluster.num_workers={self.world} is not a multiple of parallel.ep={self.ep}; "
                f"use {lower or self.ep} or {higher} workers"
            )
        gbs = self.global_batch_size
        if gbs is not None and (gbs < 1 or gbs % (self.world * self.grad_accum)):
            raise ValueError(
                f"trainer.global_batch_size={gbs} is not divisible by cluster.num_workers={self.world} x "
                f"trainer.grad_accum={self.grad_accum}"
            )
        if self.world % self.islands:
            raise ValueError(f"{self.islands} islands do not divide {self.world} ranks evenly")

    @classmethod
    def resolve(
        cls, *, world: int, ep: int, num_experts: int, global_batch_size: int | None = None, grad_accum: int = 1,
        fsdp: bool | None = None, engine: str = "native",
    ) -> Layout:  # fmt: skip
        """The layout of a job's configuration (``parallel.fsdp``, ``trainer.engine``): the one
        place the FSDP setting is resolved."""
        shape = cls(world, ep, grad_accum, num_experts=num_experts, global_batch_size=global_batch_size)
        return dataclasses.replace(shape, shard=fsdp_wanted(fsdp, engine))  # the shape's errors first

    def resized(self, world: int, ep: int, grad_accum: int) -> Layout:
        """The same job on another number of ranks (a heal, a grow): validated like the first."""
        return dataclasses.replace(self, world=world, ep=ep, grad_accum=grad_accum)

    @property
    def fsdp(self) -> bool:
        """Whether the training state is sharded with FSDP2."""
        return self.shard and self.world > 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """(world, ep, grad_accum): what tells two layouts of one job apart."""
        return self.world, self.ep, self.grad_accum

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-batch on one rank."""
        if self.global_batch_size is None:
            raise ValueError("this layout was built without the global batch size")
        return self.global_batch_size // (self.world * self.grad_accum)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same expert slice (the expert-data-parallel group's size)."""
        return self.world // self.ep

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def ep_group_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.ep
        return list(range(start, start + self.ep))

    def expert_dp_ranks(self, rank: int) -> list[int]:
        return list(range(rank % self.ep, self.world, self.ep))

    def ep_rank_of_expert(self, expert: int) -> int:
        """The expert slice (EP rank) that holds global expert ``expert``."""
        return expert // self.experts_per_rank

    def local_experts(self, rank: int) -> range:
        first = self.ep_rank(rank) * self.experts_per_rank
        return range(first, first + self.experts_per_rank)

    def describe(self) -> str:
        sharding = "fsdp on" if self.fsdp else "fsdp off"
        return f"{self.world} rank(s), ep={self.ep}, grad_accum={self.grad_accum}, {sharding}"
