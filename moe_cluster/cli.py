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

The cluster address comes from ``--address``, else ``RAY_ADDRESS``, else the local default
(http://127.0.0.1:8265). For clusters with Ray's token authentication (on by default), the
token comes from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (where ``ray start`` writes it); it is sent, never printed, and over plain
http only to loopback (``--insecure`` lifts that). What submit uploads (an allow-list, staged in a
temporary folder) and passes: submit.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from . import __version__
from .auth import auth_token, plain_http_token_error
from .submit import (
    ALLOWED, PASS_ENV, env_to_pass, left_out_summary, refusal_error, stage, upload_listing, working_dir,
)  # fmt: skip

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The source tree in an editable install (conf/ and jobs/ live here); site-packages otherwise.
ROOT = Path(__file__).resolve().parent.parent


class CliError(Exception):
    """A failure to report in one line, with exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-cluster",
        description="Train Mixture-of-Experts language models on a Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=f"moe-cluster {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_address(p):
        p.add_argument("--address", help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")
        p.add_argument(
            "--insecure", action="store_true", help="allow sending the auth token over plain http beyond loopback"
        )
        return p

    submit = with_address(sub.add_parser("submit", help="validate overrides, submit jobs/train.py to a Ray cluster"))
    submit.add_argument(
        "--working-dir", help="project checkout the job's files come from (default: this source tree)"
    )
    submit.add_argument(
        "--include", action="append", default=[], metavar="PATH",
        help=f"also upload this file or folder, relative to the working dir (repeatable; always uploaded: "
             f"{', '.join(ALLOWED)}; keys and credentials are refused either way)",
    )  # fmt: skip
    submit.add_argument(
        "--env", action="append", default=[], metavar="NAME",
        help=f"also pass this environment variable's value (repeatable; always passed when set: {', '.join(PASS_ENV)})",
    )  # fmt: skip
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit non-zero unless it succeeded")
    submit.add_argument("overrides", nargs="*", help="Hydra overrides for jobs/train.py (after --)")
    status = with_address(sub.add_parser("status", help="a job's status"))
    status.add_argument("id")
    logs = with_address(sub.add_parser("logs", help="a job's logs"))
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    stop = with_address(sub.add_parser("stop", help="stop a job"))
    stop.add_argument("id")
    with_address(sub.add_parser("list", help="the cluster's jobs"))

    export = sub.add_parser("export", help="write a checkpoint in another format (Hugging Face Mixtral)")
    export.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_XXXXXXXX), any EP size")
    export.add_argument("out", help="output directory")
    export.add_argument("--format", default="hf-mixtral", choices=["hf-mixtral"], help="output format")
    export.add_argument("--max-shard-size", default="5GB", type=_shard_size, metavar="SIZE",
                        help="most tensor bytes per safetensors file, as transformers takes it: 5GB, 500MB, 100KB "
                             "or bytes (a tensor larger than this gets a file of its own; default: 5GB)")  # fmt: skip
    export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights' dtype (default: fp32)")
    export.add_argument("--overwrite", action="store_true",
                        help="OUT may be a non-empty folder: everything in it is removed (once the checkpoint is "
                             "known to export), so no other model's files are loaded beside the export's")  # fmt: skip

    plan = sub.add_parser(
        "plan", help="memory per rank of the job these overrides make, against its GPU or host memory (docs/scaling.md)",
        description="Print each rank's memory: parameters, gradients, optimizer state, activations at peak and "
                    "transient buffers, against cluster.gpu_memory_gb (GPU workers) or the host memory of a CPU worker. "
                    "Exit status 0: the job fits; 3: it does not; 2: the overrides are invalid.",
    )  # fmt: skip
    plan.add_argument("--json", action="store_true", help="print the same figures as one JSON object")
    plan.add_argument("--load-imbalance", type=_imbalance, default=None, metavar="X",
                      help="rows a rank's experts get over the mean, allowed for with EP > 1 (default: 1.25)")  # fmt: skip
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, as for jobs/train.py")

    prep = sub.add_parser(
        "prepare", help="tokenize text files, JSONL or Parquet into train.bin / val.bin (docs/data.md)"
    )
    prep.add_argument(
        "src", help="a .jsonl / .json (JSON Lines) or .parquet file, a folder of those, or a folder of text files "
                    "(one document each, read recursively in sorted order; hidden and binary files skipped)",
    )  # fmt: skip
    prep.add_argument("out", help="output folder: train.bin, val.bin, meta.json and the tokenizer.json used")
    prep.add_argument("--tokenizer", default="bytes", metavar="bytes|PATH",
                      help="'bytes' (ids 0-255, end-of-document 256; the default), or a Hugging Face "
                           "tokenizer.json or a folder holding one (a model directory)")  # fmt: skip
    prep.add_argument("--eos-token", metavar="TOKEN",
                      help="the end-of-document token (default: tokenizer_config.json's eos_token, else </s>, "
                           "<|endoftext|>, <|end_of_text|> or <eos>, whichever the vocabulary has)")  # fmt: skip
    prep.add_argument("--text-field", default="text", help="the JSONL key or Parquet column holding the text")
    split = prep.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.005,
                       help="share of documents for validation: every round(1/F)-th, the first included (default 0.005)")  # fmt: skip
    split.add_argument("--val-every", type=int, help="every N-th document, the first included, goes to validation (N >= 2)")
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="tokenizing processes (default: the CPU count); the output is the same for any number")  # fmt: skip
    prep.add_argument("--overwrite", action="store_true",
                      help="OUT may be a non-empty folder: everything in it is replaced, once the new files "
                           "are written")  # fmt: skip

    samp = sub.add_parser("sample", help="generate text from a checkpoint, streamed to the terminal (docs/data.md)")
    samp.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_XXXXXXXX), any EP size")
    samp.add_argument("--prompt", required=True, help="the text to continue ('' starts a new document)")
    samp.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate (default: 200); "
                      "fewer when the prompt and they would pass model.max_seq_len")  # fmt: skip
    samp.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (default: 0.8)")
    samp.add_argument("--top-k", type=int, default=50, help="draw from the k likeliest tokens; 0: all (default: 50)")
    samp.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default: 0)")
    samp.add_argument("--num-samples", type=int, default=1, help="samples, one after the other (default: 1)")
    samp.add_argument("--tokenizer", metavar="bytes|PATH",
                      help="for checkpoints that carry no tokenizer: the one the run's data was prepared with")  # fmt: skip
    samp.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")

    ev = sub.add_parser("eval", help="a checkpoint's loss and perplexity on its run's data (docs/data.md)")
    ev.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_XXXXXXXX), any EP size")
    ev.add_argument("--data", metavar="PATH", help="a folder `prepare` wrote (default: the run's data)")
    ev.add_argument("--split", default="val", choices=["val", "train"], help="the split to score (default: val)")
    windows = ev.add_mutually_exclusive_group()
    windows.add_argument("--batches", type=int, metavar="N", help="global batches of the run's validation windows "
                         "(default: the run's trainer.eval_batches: the val_loss it logged)")  # fmt: skip
    windows.add_argument("--all", action="store_true", help="every window of the split, once")
    ev.add_argument("--json", action="store_true", help='print {"loss", "perplexity", "tokens"} for scripts')
    ev.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    return parser


def _address(args) -> str:
    return args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str, insecure: bool = False):
    """A client for `address`, refused before connecting when the token would travel in clear."""
    headers = _auth_headers()
    if error := plain_http_token_error(address, bool(headers), insecure):
        raise CliError(error)
    from ray.job_submission import JobSubmissionClient

    # Ray lets these variables override the address it is given: hide them while it resolves, so
    # the client talks to the address chosen (and checked) here.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # ConnectionError, or an HTTP error from a wrong endpoint
        raise CliError(
            f"cannot reach a Ray dashboard at {address} ({str(exc).splitlines()[0][:200]}); start one with "
            f"`ray start --head`, or pass --address / set RAY_ADDRESS"
        ) from None
    finally:
        os.environ.update(hidden)


def _info(client, job_id: str, address: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise CliError(f"no job with id {job_id!r} at {address}; `moe-cluster list` shows the jobs") from None
        raise


def compose_job(overrides: list[str], conf_dir: Path = ROOT / "conf"):
    """The JobConfig that jobs/train.py would run with these overrides (Hydra's compose of conf/)."""
    from hydra import compose, initialize_config_dir

    from .config import register_configs, to_job

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        return to_job(compose(config_name="config", overrides=overrides))


def validate_overrides(overrides: list[str], conf_dir: Path = ROOT / "conf") -> None:
    """Compose `conf_dir` with the overrides and validate the job, here, before anything is sent."""
    from .config import validate

    try:
        job = compose_job(overrides, conf_dir)
        # Files the job reads (data.path, model.init_from, a DeepSpeed JSON) may exist only on the
        # cluster: they are read and checked there, by jobs/train.py, before any worker starts.
        validate(job, files=False)
    except Exception as exc:  # Hydra's own messages name the key and the options
        raise CliError(f"invalid job configuration: {exc}") from None


def cmd_submit(args) -> int:
    overrides = [o for o in args.overrides if o != "--"]
    try:
        env = env_to_pass(args.env, os.environ)
        root = working_dir(args.working_dir, ROOT)
        listing = upload_listing(root, args.include)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if error := refusal_error(listing, root):
        raise CliError(error)  # before the cluster is contacted
    address = _address(args)
    if error := plain_http_token_error(address, bool(_auth_headers()), args.insecure):
        raise CliError(error)  # before the slower checks; _client checks again
    validate_overrides(overrides, root / "conf")  # the conf/ that runs on the cluster
    client = _client(address, args.insecure)
    if summary := left_out_summary(listing):
        print(summary, file=sys.stderr)
    print(f"uploading {len(listing.files)} files ({listing.size:,} bytes) from {root}", file=sys.stderr)
    entrypoint = "python jobs/train.py " + " ".join(shlex.quote(o) for o in overrides)
    # The job's working_dir is a copy of exactly the listed files: Ray packs and uploads it within
    # submit_job, so the copy can go as soon as that returns.
    with tempfile.TemporaryDirectory(prefix="moe-cluster-upload-") as staging:
        stage(root, listing.files, Path(staging))
        job_id = _submit(client, entrypoint.strip(), {"working_dir": staging, "env_vars": env})
    print(job_id)
    if env:
        print(f"passed to the job: {', '.join(sorted(env))} (names only; values are not shown)", file=sys.stderr)
    if not args.wait:
        return 0
    while str(client.get_job_status(job_id).value) not in TERMINAL:
        time.sleep(1)
    return _report_end(client, job_id, address)


def _submit(client, entrypoint: str, runtime_env: dict, wait_s: float = 60.0) -> str:
    """Submit, waiting up to ``wait_s`` for a cluster that is still starting: its dashboard answers
    before its job agent does ("No available agent to submit job, please try again later")."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise CliError(f"the cluster refused the job: {str(exc).splitlines()[0][:300]}") from None
            time.sleep(1.0)


def _report_end(client, job_id: str, address: str) -> int:
    info = _info(client, job_id, address)
    status = str(info.status.value)
    print(f"{job_id}: {status}")
    if status == "FAILED":
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-20:])
        code = getattr(info, "driver_exit_code", None)
        print(f"the job failed (exit code {code}): {info.message}\n--- last lines of its log ---\n{tail}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    address = _address(args)
    client = _client(address, args.insecure)
    info = _info(client, args.id, address)
    status = str(info.status.value)
    if status == "FAILED":
        return _report_end(client, args.id, address)
    print(f"{args.id}: {status}" + (f" ({info.message})" if info.message else ""))
    return 0


def cmd_logs(args) -> int:
    address = _address(args)
    client = _client(address, args.insecure)
    _info(client, args.id, address)
    if not args.follow:
        print(client.get_job_logs(args.id), end="")
        return 0
    import asyncio

    async def follow():
        async for chunk in client.tail_job_logs(args.id):
            print(chunk, end="", flush=True)

    asyncio.run(follow())
    return 0


def cmd_stop(args) -> int:
    address = _address(args)
    client = _client(address, args.insecure)
    _info(client, args.id, address)
    stopped = client.stop_job(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'already ended'}")
    return 0


def cmd_list(args) -> int:
    client = _client(_address(args), args.insecure)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'ID':<28} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        print(f"{(j.submission_id or j.job_id or '-'):<28} {str(j.status.value):<10} {started:<19} {j.entrypoint[:80]}")
    return 0


def cmd_prepare(args) -> int:
    from .data import prepare

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


def _shard_size(text: str) -> int:
    from .interop.hf_mixtral import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:  # argparse prints it and exits with status 2
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_export(args) -> int:
    from .interop.hf_mixtral import export_hf_mixtral

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

    from .infer import TextStream, load_model, pick_device, prompt_ids, run_tokenizer
    from .model.generate import generate

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

    from .infer import evaluate, load_model, pick_device

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


def _imbalance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"--load-imbalance must be a number >= 1 (1: perfectly even), got {text!r}")
    return value


def cmd_plan(args) -> int:
    """The memory plan of the job, as jobs/train.py composes and assembles it; exit 3 when it does not fit."""
    import json

    from .config import assemble, validate
    from .plan import LOAD_IMBALANCE, format_plan, plan_job, runs_here, suggestions, to_json

    try:
        job = assemble(compose_job([o for o in args.overrides if o != "--"]))
        validate(job, files=False, memory=False)  # the layout must make sense before it is planned
        here = runs_here(job)
        plan = plan_job(job, here=here, load_imbalance=args.load_imbalance or LOAD_IMBALANCE)
        fixes = [] if plan.fits else suggestions(job, plan, here=here)
    except Exception as exc:  # Hydra's own messages name the key and the options
        raise CliError(f"invalid job configuration: {exc}") from None
    if args.json:
        print(json.dumps({**to_json(plan), "suggestions": fixes}, indent=2))
    else:
        print(format_plan(plan))
        if fixes:
            print("what would change it (each re-planned):\n" + "\n".join(f"  {fix}" for fix in fixes))
    return 0 if plan.fits else 3


COMMANDS = {"plan": cmd_plan, "export": cmd_export, "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "list": cmd_list, "prepare": cmd_prepare,
            "sample": cmd_sample, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"moe-cluster {args.command}: error: {exc}", file=sys.stderr)
        return 2 if args.command in ("prepare", "export", "plan", "sample", "eval") else 1


if __name__ == "__main__":
    raise SystemExit(main())
