"""``moe-cluster eval|sample|export``: a checkpoint in one process (infer.py, interop/).

torch and the model are imported inside the commands: ``import moe_cluster.cli`` stays light.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import CliError

ERROR_STATUS = 2  # a CliError here: the checkpoint or the arguments cannot be used as given
CHECKPOINT_HELP = "a checkpoint directory (checkpoints/step_XXXXXXXX), any EP size"
DEVICE_HELP = "auto (CUDA when there is one), cpu, cuda or cuda:N"


def _shard_size(text: str) -> int:
    from ..interop.hf_mixtral import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:  # argparse prints it and exits with status 2
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_export(args) -> int:
    from ..interop.hf_mixtral import export_hf_mixtral

    try:
        out = export_hf_mixtral(
            args.checkpoint, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype, overwrite=args.overwrite
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    weights = shards[0] if len(shards) == 1 else f"{len(shards)} shards + model.safetensors.index.json"
    print(f"wrote {out}/config.json and {weights} ({args.dtype}; load with MixtralForCausalLM.from_pretrained)")
    if (out / "tokenizer.json").is_file():
        print(f"wrote {out}/tokenizer.json and tokenizer_config.json (load with AutoTokenizer.from_pretrained)")
    else:
        print("wrote no tokenizer files: the checkpoint carries no tokenizer (written before checkpoints did)")
    return 0


def _sampling_args(args) -> None:
    bad = [
        (args.max_new_tokens < 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (not args.temperature >= 0, f"--temperature must be >= 0 (0: greedy), got {args.temperature}"),
        (args.top_k < 0, f"--top-k must be >= 0 (0: no limit), got {args.top_k}"),
        (args.num_samples < 1, f"--num-samples must be >= 1, got {args.num_samples}"),
    ]
    for wrong, message in bad:
        if wrong:
            raise CliError(message)


def cmd_sample(args) -> int:
    import torch

    from ..infer import TextStream, load_model, pick_device, prompt_ids, run_tokenizer
    from ..model.generate import generate

    _sampling_args(args)
    try:
        device = pick_device(args.device)
        model, info = load_model(args.checkpoint, device)
        cfg = model.config
        tokenizer = run_tokenizer(args.checkpoint, info, cfg.vocab_size, args.tokenizer)
        ids = prompt_ids(tokenizer, args.prompt, cfg.max_seq_len, cfg.vocab_size)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    room = cfg.max_seq_len - len(ids)
    if room < 1:
        raise CliError(
            f"the prompt is {len(ids)} tokens and fills model.max_seq_len={cfg.max_seq_len}: nothing can follow it; "
            "shorten the prompt"
        )
    new = min(args.max_new_tokens, room)
    print(f"step {info.get('step')}, {tokenizer.spec.name} tokenizer, {len(ids)} prompt tokens, on {device}",
          file=sys.stderr)  # fmt: skip
    if new < args.max_new_tokens:
        print(f"note: {new} new tokens, not {args.max_new_tokens}: {len(ids)} + {new} fill model.max_seq_len="
              f"{cfg.max_seq_len}", file=sys.stderr)  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)  # one stream for all samples: sample 1 is the same for any N

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    for i in range(args.num_samples):
        if i:
            write("-" * 40 + "\n")
        write(args.prompt)
        stream = TextStream(tokenizer)
        start = time.perf_counter()
        try:
            out = generate(
                model, ids, new, temperature=args.temperature, top_k=args.top_k or None, generator=generator,
                stop_id=tokenizer.stop_id, on_token=lambda t: write(stream.push(t)) if t != tokenizer.stop_id else None,
            )  # fmt: skip
        except ValueError as exc:
            write("\n")
            raise CliError(str(exc)) from None
        write(stream.flush() + "\n")
        seconds = time.perf_counter() - start
        ended = "the end-of-document token" if out[-1] == tokenizer.stop_id else f"{new} tokens"
        rate = len(out) / max(seconds, 1e-9)
        print(f"[{len(out)} tokens in {seconds:.2f} s ({rate:.1f} tokens/s); ended by {ended}]", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    import json

    from ..infer import evaluate, load_model, pick_device

    try:
        model, info = load_model(args.checkpoint, pick_device(args.device))
        r = evaluate(model, info, data=args.data, split=args.split, batches=args.batches, all_windows=args.all)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps({"loss": r["loss"], "perplexity": r["perplexity"], "tokens": r["tokens"]}))
        return 0
    shape = f"{r['global_batch_size']} x {r['seq_len']}"
    how = f"up to {shape}, every window once" if args.all else f"{shape}, drawn as the run's validation batches"
    print(
        f"step {r['step']}, {r['split']} split: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f} "
        f"({r['tokens']:,} tokens: {r['batches']} batches of {how})"
    )
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint in another format (Hugging Face Mixtral)")
    p.set_defaults(func=cmd_export, error_status=ERROR_STATUS)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("out", help="output directory")
    p.add_argument("--format", default="hf-mixtral", choices=["hf-mixtral"], help="output format")
    p.add_argument("--max-shard-size", default="5GB", type=_shard_size, metavar="SIZE",
                   help="most tensor bytes per safetensors file, as transformers takes it: 5GB, 500MB, 100KB "
                        "or bytes (a tensor larger than this gets a file of its own; default: 5GB)")  # fmt: skip
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights' dtype (default: fp32)")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT may be a non-empty folder: everything in it is removed (once the checkpoint is "
                        "known to export), so no other model's files are loaded beside the export's")  # fmt: skip


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint, streamed to the terminal (docs/data.md)")
    p.set_defaults(func=cmd_sample, error_status=ERROR_STATUS)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--prompt", required=True, help="the text to continue ('' starts a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate (default: 200); "
                   "fewer when the prompt and they would pass model.max_seq_len")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="draw from the k likeliest tokens; 0: all (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default: 0)")
    p.add_argument("--num-samples", type=int, default=1, help="samples, one after the other (default: 1)")
    p.add_argument("--tokenizer", metavar="bytes|PATH",
                   help="for checkpoints that carry no tokenizer: the one the run's data was prepared with")  # fmt: skip
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="a checkpoint's loss and perplexity on its run's data (docs/data.md)")
    p.set_defaults(func=cmd_eval, error_status=ERROR_STATUS)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--data", metavar="PATH", help="a folder `prepare` wrote (default: the run's data)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="the split to score (default: val)")
    windows = p.add_mutually_exclusive_group()
    windows.add_argument("--batches", type=int, metavar="N", help="global batches of the run's validation windows "
                         "(default: the run's trainer.eval_batches: the val_loss it logged)")  # fmt: skip
    windows.add_argument("--all", action="store_true", help="every window of the split, once")
    p.add_argument("--json", action="store_true", help='print {"loss", "perplexity", "tokens"} for scripts')
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


COMMANDS = {"export": add_export, "sample": add_sample, "eval": add_eval}
