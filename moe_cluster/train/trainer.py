"""The SPMD training core: what each rank runs, with or without Ray around it.

A ``Trainer`` owns one rank's model shard, optimizer, data sampler and checkpoint I/O. Every
rank constructs it with the same configs; ranks differ only by their place in the process group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..data import MixtureSampler, WindowSampler, load_bin, stdlib_corpus
from ..data.config import DataConfig
from ..model import ModelConfig, Transformer, flops_per_token
from ..parallel import Layout, build_process_groups, parallelize, reshard, shard_offset
from . import checkpoint, run_info
from .config import TrainConfig, check_train_config
from .optim import build_optimizer
from .step import Diverged, loss_fn, train_step


def load_tokens(cfg: DataConfig, split: str, vocab_size: int) -> np.ndarray | list[np.ndarray]:
    """The split's token stream; with ``data.mixture``, one stream per source."""
    if cfg.source == "stdlib":
        return stdlib_corpus(split, cfg.max_bytes)
    if cfg.source == "bin" and cfg.mixture:
        return [load_bin(f"{s.path}/{split}.bin", vocab_size) for s in cfg.mixture]
    if cfg.source == "bin":
        if not cfg.path:
            raise ValueError("data.source=bin needs data.path, the folder holding train.bin and val.bin")
        return load_bin(f"{cfg.path}/{split}.bin", vocab_size)
    raise ValueError(f"data.source={cfg.source!r} is unknown; use 'stdlib' or 'bin'")


def split_name(cfg: DataConfig, split: str) -> str:
    """Where ``split``'s tokens come from, for messages: the file, or the folders of a mixture."""
    if cfg.source == "bin" and cfg.mixture:
        return f"{split}.bin of data.mixture ({', '.join(s.path for s in cfg.mixture)})"
    if cfg.source == "bin":
        return f"{cfg.path}/{split}.bin"
    return f"the {split} split of data.source={cfg.source}"


def make_sampler(tokens, cfg: DataConfig, train_cfg: TrainConfig, rank: int, world: int, seed: int, split: str = "train"):
    """A WindowSampler over ``tokens``, or a MixtureSampler over the list load_tokens gives a mixture.
    A corpus too small for one global batch is a ValueError naming ``split``'s file."""
    args = (train_cfg.seq_len, train_cfg.global_batch_size, rank, world, seed)
    try:
        if isinstance(tokens, list):
            return MixtureSampler(tokens, [s.weight for s in cfg.mixture], *args)
        return WindowSampler(tokens, *args)
    except ValueError as exc:
        raise ValueError(f"{split_name(cfg, split)}: {exc}") from None


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(())
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


EVAL_SEED = 12345  # the validation windows' order: the same at every evaluation (and in `moe-cluster eval`)


def local_layout(model_cfg: ModelConfig, train_cfg: TrainConfig, *, ep: int = 1, fsdp: bool | None = None) -> Layout:
    """The layout of the process group this process is in (the ranks of ``train.launch``, or
    this process alone), for the SPMD core run without a job around it (train/local.py, tests).
    A job's workers get the job's layout instead (``config.job_layout``, resized after a heal)."""
    return Layout.resolve(
        world=dist.get_world_size() if dist.is_initialized() else 1, ep=ep, num_experts=model_cfg.moe.num_experts,
        global_batch_size=train_cfg.global_batch_size, grad_accum=train_cfg.grad_accum, fsdp=fsdp,
        engine=train_cfg.engine,
    )  # fmt: skip


class Trainer:
    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        data_cfg: DataConfig,
        layout: Layout | None = None,
        *,
        checkpoint_dir: str | None = None,
        device: str | torch.device = "cpu",
        deepspeed: Mapping | None = None,
        init_weights: Callable[[nn.Module, range], None] | None = None,
    ):
        """``layout``: how the ranks are arranged (world, ep, grad_accum, FSDP), as the job was
        assembled (``config.job_layout``) or a heal resized it; its ``grad_accum`` is the one
        stepped on (a shrunk layout takes more micro-batches for the same global batch). None:
        ``local_layout`` (this process group, ep 1, ``parallel.fsdp`` unset).

        ``deepspeed``: the user's DeepSpeed config keys, for ``train_cfg.engine == "deepspeed"``.

        ``init_weights(model, experts)``: loads starting weights into the freshly initialised
        model, whose stacked expert tensors hold the global ``experts``; how ``model.init_from``
        is read is decided where the job is assembled (e.g. ``interop.hf_mixtral.weights_loader``),
        and ``model_cfg`` is then already the architecture it names.

        ``fsdp`` (``parallel.fsdp``): shard the native engine's training state with FSDP2 (see
        ``moe_cluster.parallel.fsdp``); None: on when there is more than one rank.
        """
        if model_cfg.init_from and init_weights is None:
            raise ValueError(
                f"model.init_from={model_cfg.init_from!r} needs its weights loader: pass init_weights "
                f"(moe_cluster.interop.hf_mixtral.weights_loader), as the Ray service does"
            )
        self.model_cfg, self.cfg, self.data_cfg = model_cfg, train_cfg, data_cfg
        self.device = torch.device(device)
        check_train_config(train_cfg)
        layout = layout or local_layout(model_cfg, train_cfg)
        if layout.num_experts != model_cfg.moe.num_experts or layout.global_batch_size not in (None, train_cfg.global_batch_size):
            raise ValueError(f"the layout ({layout}) is not this job's: build it with config.job_layout or local_layout")
        if model_cfg.vocab_size is None:
            raise ValueError(
                "model.vocab_size is null (take the data's): moe_cluster.config.assemble fills it in from "
                "data.path's meta.json, as the Ray service does; call it first, or set model.vocab_size"
            )
        if train_cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(
                f"trainer.seq_len={train_cfg.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
            )
        if layout.fsdp and train_cfg.engine == "deepspeed":
            raise ValueError("a layout with FSDP on cannot run trainer.engine=deepspeed: build it with Layout.resolve")
        self.layout, self.fsdp = layout, layout.fsdp
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.rank, self.world = rank, layout.world
        self.groups = build_process_groups(self.layout)
        # Built on the meta device; parallelize then splits the experts, materialises this rank's
        # share, initialises it as the unsharded model would be, and shards it (its doc: the order).
        with torch.device("meta"):
            self.model = Transformer(model_cfg)

        def init(model: Transformer, experts: range) -> None:
            model.init_weights(train_cfg.seed, experts=experts)
            if init_weights is not None:
                init_weights(model, experts)

        parallelize(
            self.model, self.groups, activation_checkpointing=model_cfg.activation_checkpointing,
            init_weights=init, device=self.device,
        )  # fmt: skip
        torch.manual_seed(train_cfg.seed)  # the RNG state checkpoints carry starts from the seed
        self.ds = None  # the DeepSpeed engine, when trainer.engine=deepspeed
        if train_cfg.engine == "deepspeed":
            from .ds_config import resolve_config
            from .ds_engine import DeepSpeedEngine, select_accelerator

            select_accelerator(self.device)  # before resolve_config imports DeepSpeed
            ds_config = resolve_config(deepspeed or {}, layout, train_cfg.optim)
            self.ds = DeepSpeedEngine(self.model, self.groups, train_cfg.optim, ds_config)
            self.optimizer = self.ds.optimizer
        else:
            self.optimizer = build_optimizer(self.model, train_cfg.optim)
        train_tokens = load_tokens(data_cfg, "train", model_cfg.vocab_size)
        self.sampler = make_sampler(train_tokens, data_cfg, train_cfg, rank, layout.world, train_cfg.seed)
        self.val_tokens = load_tokens(data_cfg, "val", model_cfg.vocab_size)
        if train_cfg.eval_every:  # a validation split too small fails here, not at the first evaluation
            make_sampler(self.val_tokens, data_cfg, train_cfg, rank, layout.world, EVAL_SEED, split="val")
        self.checkpoint_dir = checkpoint_dir
        self.step = 0
        self.nan_skips = 0  # steps skipped in a row for a non-finite loss or gradient norm (nan_policy=skip)
        self.flops_per_token = flops_per_token(model_cfg, train_cfg.seq_len)

    # -- training ---------------------------------------------------------------------------

    def _micro_batches(self):
        inputs, targets = self.sampler.next_batch()
        n = self.layout.grad_accum
        return [(i.to(self.device), t.to(self.device)) for i, t in zip(inputs.chunk(n), targets.chunk(n))]

    def train_step(self) -> dict:
        """One optimizer step on every rank; returns metrics averaged over ranks."""
        self.model.train()
        start = time.perf_counter()
        bias_rate = self.model_cfg.moe.bias_update_rate if self.model_cfg.moe.expert_bias else 0.0
        try:
            if self.ds is not None:
                out = self.ds.train_step(self.step, self._micro_batches(), bias_rate)
            else:
                out = train_step(
                    self.model, self.optimizer, self.step, self._micro_batches(), self.groups, self.cfg.optim, bias_rate
                )
        except BaseException:
            # A forward that failed part way (a peer lost) leaves its layers' losses, and the graph
            # they hold, behind: let go of them, so that the model and its groups can be freed.
            self.model.pop_aux_loss()
            raise
        self.step += 1
        self._apply_nan_policy(out)
        metrics = {k: _mean_over_ranks(v) if torch.is_tensor(v) else v for k, v in out.items()}
        seconds = time.perf_counter() - start
        tokens = self.cfg.global_batch_size * self.cfg.seq_len
        metrics.update(step=self.step, seconds=seconds, tokens_per_s=tokens / seconds)
        if self.cfg.peak_flops > 0:
            metrics["mfu"] = self.flops_per_token * tokens / seconds / (self.cfg.peak_flops * self.world)
        metrics["expert_counts"] = [layer.stats.tokens_per_expert.tolist() for layer in self.model.moe_layers()]
        metrics["dropped_tokens"] = sum(int(layer.stats.dropped_tokens) for layer in self.model.moe_layers())
        return metrics

    def _apply_nan_policy(self, out: dict) -> None:
        """Raise Diverged (on every rank alike: the step's vote was collective) when the step's loss
        or gradient norm was not finite and ``trainer.nan_policy`` says stop, or the skips ran out."""
        if not (out.get("skipped") or out.get("diverged")):
            self.nan_skips = 0
            return
        self.nan_skips += 1
        policy, limit = self.cfg.nan_policy, self.cfg.max_nan_skips
        if policy == "skip" and out.get("skipped") and self.nan_skips <= limit:
            return
        loss, norm = float(out["loss"]), float(out["grad_norm"])
        why = (
            f"{self.nan_skips} step(s) in a row, trainer.max_nan_skips={limit}" if policy == "skip"
            else "trainer.nan_policy=stop"
        )  # fmt: skip
        raise Diverged(
            f"the run diverged at step {self.step}: loss {loss}, gradient norm {norm} ({why}); no checkpoint holds "
            "this step or any after it. Resume from the last checkpoint with a lower "
            "trainer.optim.lr (or a smaller trainer.optim.grad_clip), or set trainer.nan_policy=skip to step over "
            "isolated bad batches"
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over a fixed set of windows (the same at every call)."""
        self.model.eval()
        sampler = make_sampler(self.val_tokens, self.data_cfg, self.cfg, self.rank, self.world, EVAL_SEED, split="val")
        losses = []
        for _ in range(self.cfg.eval_batches):
            inputs, targets = sampler.next_batch()
            _, ce = loss_fn(self.model, inputs.to(self.device), targets.to(self.device))
            losses.append(ce)
        if self.fsdp:
            reshard(self.model)  # a forward without backward leaves the root's weights gathered
        return _mean_over_ranks(torch.stack(losses).mean())

    # -- checkpoints -----------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict]:
        """(the DCP state of this rank, its optimizer state per parameter name)."""
        extra = {"rng": torch.get_rng_state()}  # tensors only; the step and sampler go into the marker (JSON)
        if self.ds is not None:
            optim_state = self.ds.optimizer_state()  # assembled from the ZeRO partitions
        else:
            optim_state = checkpoint.optimizer_state(self.model, self.optimizer)
        return checkpoint.build_state(self.model, optim_state, self.groups, extra), optim_state

    def save_checkpoint(self):
        if not self.checkpoint_dir:
            raise ValueError("no checkpoint directory was given to the Trainer")
        # The run's settings and tokenizer travel with the weights: sample, eval and export read
        # them there (run_info.py).
        info = {"model_config": dataclasses.asdict(self.model_cfg), "sampler": self.sampler.state_dict()}
        info.update(run_info.checkpoint_info(self.cfg, self.data_cfg))
        tokenizer = run_info.tokenizer_file(self.data_cfg, info["tokenizer"]) if self.rank == 0 else None
        if tokenizer is not None:  # what readers check the copy against (run_info.checkpoint_tokenizer)
            info["tokenizer"]["file_sha256"] = hashlib.sha256(tokenizer).hexdigest()
        return checkpoint.save(
            self.checkpoint_dir, self.step, self._state()[0], keep=self.cfg.keep_checkpoints, info=info,
            files={run_info.TOKENIZER_FILE: tokenizer} if tokenizer is not None else None,
        )  # fmt: skip

    def resume(self, path=None) -> bool:
        """Load ``path``, or the latest complete checkpoint; False when there is none."""
        path = path or (self.checkpoint_dir and checkpoint.latest_checkpoint(self.checkpoint_dir))
        if not path:
            return False
        checkpoint.check_model_config(path, self.model_cfg)
        state, optim_state = self._state()
        extra = checkpoint.load(path, state)  # in place: into the model, and into optim_state's tensors
        if self.ds is not None:
            self.ds.load_optimizer_state(optim_state)  # split into the ZeRO partitions
        self.step = int(extra["step"])
        self.sampler.load_state_dict(extra["sampler"])
        torch.set_rng_state(extra["rng"])
        return True

    # -- in-memory state: what a peer keeps of this rank, and how a rank is rebuilt from it ---

    def snapshot(self, copy: bool = True) -> dict:
        """This rank's whole training state as host tensors that later steps do not change.

        Keys are the checkpoint's (``model/<name>``, ``optim/<name>.exp_avg``, ..., experts by
        global index: ``model/blocks.0.ffn.experts.w_up.e5``), plus ``extra`` (step, sampler, RNG).
        So snapshots of several ranks merge into one dict from which a rank of any layout takes the
        keys it holds (``restore``): that is how a replacement or a re-sharded rank is rebuilt from
        peers' memory. ``copy=False``: CPU tensors are views of the live state, for a caller that
        serialises them at once.
        """
        state, _ = self._state()
        pieces = {}
        for section in ("model", "optim"):
            for key, value in state[section].items():
                if isinstance(value, DTensor):  # an FSDP shard: named by where it sits in the whole
                    dim, offset = shard_offset(value)
                    key, value = f"{key}@{dim}.{offset}", value.to_local()
                pieces[f"{section}/{key}"] = value.detach().to("cpu", copy=copy)
        pieces["extra"] = {"step": self.step, "sampler": self.sampler.state_dict(), "rng": torch.get_rng_state()}
        return pieces

    def restore(self, pieces: Mapping) -> None:
        """Load a snapshot, or the union of several ranks' snapshots, into this rank (in place).

        A tensor this rank holds whole or in part is cut from the piece holding it whole, or from
        the shards (``key@dim.offset``) that together hold it, whatever layout wrote them.
        """
        state, optim_state = self._state()
        shards: dict[str, list] = {}
        for name, value in pieces.items():
            base, at, where = name.partition("@")
            if at:
                dim, offset = where.split(".")
                shards.setdefault(base, []).append((int(dim), int(offset), value))
        missing = [
            f"{section}/{key}" for section in ("model", "optim") for key in state[section]
            if f"{section}/{key}" not in pieces and f"{section}/{key}" not in shards
        ]  # fmt: skip
        if missing or "extra" not in pieces:
            raise ValueError(f"the snapshot lacks {len(missing)} tensors this rank holds, e.g. {missing[:3]}")
        with torch.no_grad(), warnings.catch_warnings():
            # Pieces may be read-only NumPy arrays (Ray's zero-copy reads): they are only read here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for section in ("model", "optim"):
                for key, value in state[section].items():
                    name = f"{section}/{key}"
                    whole = torch.as_tensor(pieces[name]) if name in pieces else _join(shards[name])
                    if isinstance(value, DTensor):
                        dim, offset = shard_offset(value)
                        local = value.to_local()
                        local.copy_(whole.narrow(dim, offset, local.shape[dim]))
                    else:
                        value.copy_(whole)
            rng = torch.as_tensor(pieces["extra"]["rng"]).clone()
        if self.ds is not None:
            self.ds.load_optimizer_state(optim_state)
        extra = pieces["extra"]
        self.step = int(extra["step"])
        self.sampler.load_state_dict(extra["sampler"])
        torch.set_rng_state(rng)


def _join(shards: list) -> torch.Tensor:
    """The whole tensor from its shards ((dim, offset, piece), one dim, any order)."""
    dims = {dim for dim, _, _ in shards}
    if len(dims) != 1:
        raise ValueError(f"shards of one tensor split on several dims: {sorted(dims)}")
    (dim,) = dims
    ordered = sorted(shards, key=lambda s: s[1])
    offsets = [o for _, o, _ in ordered]
    pieces = [torch.as_tensor(p) for _, _, p in ordered]
    ends = [o + p.shape[dim] for o, p in zip(offsets, pieces)]
    if offsets[0] != 0 or any(e != o for e, o in zip(ends, offsets[1:])):
        raise ValueError(f"shards do not tile the tensor: offsets {offsets}, ends {ends}")
    return torch.cat(pieces, dim=dim)
