"""The ``moe-cluster`` command line."""

from __future__ import annotations

import argparse

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-cluster",
        description="Train Mixture-of-Experts language models on a Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=f"moe-cluster {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    prep = sub.add_parser("prepare", help="byte-tokenise a folder of text files into train.bin / val.bin")
    prep.add_argument("src", help="folder of text files (read recursively, in sorted order)")
    prep.add_argument("out", help="output folder for train.bin, val.bin and meta.json")
    prep.add_argument("--val-every", type=int, default=20, help="every N-th file goes to validation")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "prepare":
        from .data import prepare

        try:
            meta = prepare(args.src, args.out, args.val_every)
        except ValueError as exc:
            parser.exit(2, f"moe-cluster prepare: error: {exc}\n")
        print(f"wrote {args.out}/train.bin ({meta['tokens']['train']:,} tokens), val.bin ({meta['tokens']['val']:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
