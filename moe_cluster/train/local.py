"""Train on local processes (gloo on CPU), without Ray: the SPMD core on its own.

    python -m moe_cluster.train.local --preset tiny --world 2 --ep 2 --steps 400
    python -m moe_cluster.train.local --engine deepspeed --zero-stage 2 ...   # DeepSpeed ZeRO

Rank 0 prints progress and writes ``metrics.jsonl`` (one JSON object per step, with the
validation loss at each evaluation) into ``--out``; checkpoints go to ``--out/checkpoints``.
Evaluations and checkpoints fall where the Ray workers' do (train/loop.py), the last step included.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data import stdlib_corpus
from ..data.config import DataConfig
from ..model import preset
from .config import OptimConfig, TrainConfig
from .launch import launch
from .loop import steps
from .trainer import Trainer, local_layout


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the corpus' token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(tokens, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run(model_cfg, train_cfg: TrainConfig, data_cfg: DataConfig, ep: int, out: str, deepspeed=None) -> list[dict]:
    layout = local_layout(model_cfg, train_cfg, ep=ep)
    trainer = Trainer(model_cfg, train_cfg, data_cfg, layout, checkpoint_dir=f"{out}/checkpoints", deepspeed=deepspeed)
    trainer.resume()
    rank0 = trainer.rank == 0
    log = open(Path(out) / "metrics.jsonl", "a") if rank0 else None
    history = []
    for m in steps(trainer, max(0, train_cfg.max_steps - trainer.step)):
        step = m["step"]
        if rank0:
            m.pop("expert_counts")
            log.write(json.dumps(m) + "\n")
            log.flush()
            val = f"  val {m['val_loss']:.3f}" if "val_loss" in m else ""
            print(f"step {step:5d}  loss {m['loss']:.3f}{val}  {m['tokens_per_s']:,.0f} tok/s", flush=True)
        history.append(m)
    return history


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="global batch size (sequences)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("native", "deepspeed"), default="native")
    p.add_argument("--zero-stage", type=int, default=1, help="ZeRO stage with --engine deepspeed (1 or 2)")
    p.add_argument("--out", default="outputs/local")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    optim = OptimConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=20, decay_steps=args.steps)
    train_cfg = TrainConfig(
        max_steps=args.steps, global_batch_size=args.batch, seq_len=args.seq_len, seed=args.seed,
        eval_every=args.eval_every, checkpoint_every=args.eval_every, optim=optim, engine=args.engine,
    )  # fmt: skip
    deepspeed = {"zero_optimization": {"stage": args.zero_stage}}
    model_cfg = replace(preset(args.preset), max_seq_len=max(args.seq_len, preset(args.preset).max_seq_len))
    entropy = unigram_entropy(stdlib_corpus("train"))
    print(f"byte-unigram entropy of the training corpus: {entropy:.3f} nats ({entropy / math.log(2):.3f} bits)")
    history = launch(args.world, run, model_cfg, train_cfg, DataConfig(), args.ep, args.out, deepspeed)[0]
    evals = [m for m in history if "val_loss" in m]
    if evals:
        print(f"validation loss: {evals[0]['val_loss']:.3f} at step {evals[0]['step']} -> "
              f"{evals[-1]['val_loss']:.3f} at step {evals[-1]['step']} (unigram entropy {entropy:.3f})")


if __name__ == "__main__":
    main()
