"""The ``moe-cluster`` command line.

    moe-cluster submit [--address URL] [--working-dir DIR] [--include PATH]... [--env NAME]... [--wait] -- <overrides>
    moe-cluster status ID | logs ID [--follow] | stop ID | list
    moe-cluster plan [--json] [--load-imbalance 1.25] <hydra overrides>   # memory per rank; exit 3: does not fit
    moe-cluster prepare SRC OUT [--tokenizer bytes|PATH] [--text-field text] [--val-fraction 0.005] [--workers N]
                        [--overwrite]                       # OUT: a new or empty folder, unless --overwrite
    moe-cluster export CHECKPOINT OUT [--max-shard-size 5GB] [--dtype fp32|bf16] [--overwrite]
                                                            # Hugging Face Mixtral + tokenizer
    moe-cluster sample CHECKPOINT --prompt TEXT [--max-new-tokens 200] [--temperature 0.8] [--top-k 50] [--seed 0]
                       [--num-samples 1]                              # streamed; --temperature 0: greedy
    moe-cluster eval CHECKPOINT [--data PATH] [--split val] [--batches N | --all] [--json]   # loss, perplexity

One module per command group, each registering its commands (``COMMANDS``: name -> the function
that adds its subparser, handler and ``error_status``): jobs.py (submit, status, logs, stop, list),
checkpoints.py (eval, sample, export), data.py (prepare), plan.py (plan). A command's one-line
failure is a CliError (errors.py) or the dashboard's DashboardError.

The cluster address comes from ``--address``, else ``RAY_ADDRESS``, else the local default
(http://127.0.0.1:8265). For clusters with Ray's token authentication (on by default), the
token comes from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (where ``ray start`` writes it); it is sent, never printed, and over plain
http only to loopback (``--insecure`` lifts that): dashboard.py. What submit uploads (an
allow-list, staged in a temporary folder) and passes: submit.py.

``import moe_cluster.cli`` imports no torch: every heavy import is inside a command.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..dashboard import DashboardError
from . import checkpoints, data, jobs, plan
from .errors import CliError

__all__ = ["CliError", "build_parser", "main"]
# The order `moe-cluster --help` lists the commands in.
ORDER = ("submit", "status", "logs", "stop", "list", "export", "plan", "prepare", "sample", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-cluster",
        description="Train Mixture-of-Experts language models on a Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=f"moe-cluster {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    adders = {**jobs.COMMANDS, **checkpoints.COMMANDS, **data.COMMANDS, **plan.COMMANDS}
    for name in ORDER:
        adders[name](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (CliError, DashboardError) as exc:
        print(f"moe-cluster {args.command}: error: {exc}", file=sys.stderr)
        return args.error_status
