"""Activation checkpointing: bytes kept for backward and step time of each mode.

    python jobs/bench_checkpointing.py                          # small preset, seq 128, batch 8
    python jobs/bench_checkpointing.py --preset tiny --batch 16 --reps 10

One model, one process: the modes (``model.activation_checkpointing``) are switched on the same
weights between steps, and each repetition runs every mode once, in a rotating order, so machine
noise hits them alike; medians reported. A step is forward, loss (cross-entropy + aux losses) and
backward; the optimizer's step does not depend on the mode and is left out. Each step is timed
by the wall clock and by this process's CPU time (``time.process_time``): on a shared machine
the CPU time moves far less with the other processes' load (run with ``--threads 1`` so that
it counts one thread's work). The kept bytes are measured on a forward of their own
(``kept_activation_bytes``: what is still alive when the forward returns, parameters excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench import machine  # jobs/bench.py, beside this script
from moe_cluster.model import Transformer, preset
from moe_cluster.parallel import apply_activation_checkpointing
from moe_cluster.parallel.checkpointing import MODES, kept_activation_bytes


def run(args) -> dict[str, dict]:
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, max_seq_len=max(args.seq, preset(args.preset).max_seq_len)))
    vocab = model.config.vocab_size
    tokens_BS = torch.randint(0, vocab, (args.batch, args.seq + 1))

    def loss_fn():
        logits_BSV = model(tokens_BS[:, :-1])
        return F.cross_entropy(logits_BSV.flatten(0, 1), tokens_BS[:, 1:].flatten()) + model.aux_loss()

    def step(mode: str) -> tuple[float, float]:
        apply_activation_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        loss_fn().backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    rows = {}
    for mode in MODES:
        apply_activation_checkpointing(model, mode)
        loss, kept = kept_activation_bytes(loss_fn)
        del loss
        rows[mode] = {"kept_bytes": kept, "seconds": [], "cpu_seconds": []}
    for rep in range(args.warmup + args.reps):
        for i in range(len(MODES)):
            mode = MODES[(rep + i) % len(MODES)]
            wall, cpu = step(mode)
            if rep >= args.warmup:
                rows[mode]["seconds"].append(wall)
                rows[mode]["cpu_seconds"].append(cpu)
    for row in rows.values():
        row["median_s"] = statistics.median(row["seconds"])
        row["median_cpu_s"] = statistics.median(row["cpu_seconds"])
    return rows


def markdown(rows: dict, args) -> str:
    none = rows["none"]
    out = (
        f"{args.preset} preset, batch {args.batch} x seq {args.seq}, fp32, CPU; forward+backward, median of "
        f"{args.reps} interleaved repetitions after {args.warmup} warm-up\n\n"
        "| mode | kept for backward (MB) | vs none | step, wall (s) | vs none | step, CPU (s) | vs none |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for mode, r in rows.items():
        out += (
            f"| {mode} | {r['kept_bytes'] / 2**20:.1f} | {r['kept_bytes'] / none['kept_bytes']:.2f} "
            f"| {r['median_s']:.2f} | {r['median_s'] / none['median_s']:.2f} "
            f"| {r['median_cpu_s']:.2f} | {r['median_cpu_s'] / none['median_cpu_s']:.2f} |\n"
        )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    print(markdown(run(args), args))


if __name__ == "__main__":
    main()
