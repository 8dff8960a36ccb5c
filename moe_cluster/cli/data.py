"""``moe-cluster prepare``: text files, JSONL or Parquet into train.bin / val.bin (data/prepare.py)."""

from __future__ import annotations

import os
import sys
import time

from .errors import CliError

ERROR_STATUS = 2  # a CliError here: the input or the arguments cannot be used as given


def cmd_prepare(args) -> int:
    from ..data import prepare

    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    start = time.perf_counter()
    try:
        meta = prepare(
            args.src, args.out, tokenizer=args.tokenizer, text_field=args.text_field, val_fraction=args.val_fraction,
            val_every=args.val_every, workers=args.workers, eos_token=args.eos_token, progress=sys.stderr.isatty(),
            overwrite=args.overwrite,
        )  # fmt: skip
    except ValueError as exc:
        raise CliError(str(exc)) from None
    seconds = time.perf_counter() - start
    tokens, docs, skipped = meta["tokens"], meta["documents"], meta["skipped"]
    total = tokens["train"] + tokens["val"]
    print(
        f"wrote {args.out}/train.bin ({tokens['train']:,} tokens, {docs['train']:,} documents), "
        f"val.bin ({tokens['val']:,}, {docs['val']:,}); {meta['tokenizer']['name']} tokenizer, vocab_size "
        f"{meta['vocab_size']}, eos_id {meta['eos_id']}, {meta['dtype']}; "
        f"skipped {skipped['hidden']} hidden and {skipped['binary']} binary files; "
        f"{total / max(seconds, 1e-9):,.0f} tokens/s ({seconds:.1f} s)"
    )
    return 0


def add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize text files, JSONL or Parquet into train.bin / val.bin (docs/data.md)"
    )
    p.set_defaults(func=cmd_prepare, error_status=ERROR_STATUS)
    p.add_argument(
        "src", help="a .jsonl / .json (JSON Lines) or .parquet file, a folder of those, or a folder of text files "
                    "(one document each, read recursively in sorted order; hidden and binary files skipped)",
    )  # fmt: skip
    p.add_argument("out", help="output folder: train.bin, val.bin, meta.json and the tokenizer.json used")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|PATH",
                   help="'bytes' (ids 0-255, end-of-document 256; the default), or a Hugging Face "
                        "tokenizer.json or a folder holding one (a model directory)")  # fmt: skip
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="the end-of-document token (default: tokenizer_config.json's eos_token, else </s>, "
                        "<|endoftext|>, <|end_of_text|> or <eos>, whichever the vocabulary has)")  # fmt: skip
    p.add_argument("--text-field", default="text", help="the JSONL key or Parquet column holding the text")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.005,
                       help="share of documents for validation: every round(1/F)-th, the first included (default 0.005)")  # fmt: skip
    split.add_argument("--val-every", type=int,
                       help="every N-th document, the first included, goes to validation (N >= 2)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizing processes (default: the CPU count); the output is the same for any number")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="OUT may be a non-empty folder: everything in it is replaced, once the new files "
                        "are written")  # fmt: skip


COMMANDS = {"prepare": add_prepare}
