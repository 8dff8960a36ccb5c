"""The ``moe-cluster`` command line.

    moe-cluster submit [--address URL] [--working-dir DIR] [--env NAME]... [--wait] -- <hydra overrides>
    moe-cluster status ID | logs ID [--follow] | stop ID | list
    moe-cluster prepare SRC OUT

The cluster address comes from ``--address``, else ``RAY_ADDRESS``, else the local default
(http://127.0.0.1:8265). For clusters with Ray's token authentication (on by default), the
token comes from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (where ``ray start`` writes it); it is sent, never printed, and over plain
http only to loopback (``--insecure`` lifts that). What submit uploads and passes: submit.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__
from .submit import NEVER_UPLOAD, PASS_ENV, env_to_pass, plain_http_token_error, upload_listing, working_dir

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
        "--working-dir", help="project checkout uploaded as the job's working_dir (default: this source tree)"
    )
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

    prep = sub.add_parser("prepare", help="byte-tokenise a folder of text files into train.bin / val.bin")
    prep.add_argument(
        "src", help="folder of text files (read recursively, in sorted order; hidden and binary files skipped)"
    )
    prep.add_argument("out", help="output folder for train.bin, val.bin and meta.json")
    prep.add_argument(
        "--val-every", type=int, default=20, help="every N-th file, the first included, goes to validation (N >= 2)"
    )
    return parser


def _address(args) -> str:
    return args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        token = path.read_text().strip() if path.is_file() else ""
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


def validate_overrides(overrides: list[str], conf_dir: Path = ROOT / "conf") -> None:
    """Compose `conf_dir` with the overrides and validate the job, here, before anything is sent."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .config import register_configs, validate

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            job = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
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
    except ValueError as exc:
        raise CliError(str(exc)) from None
    address = _address(args)
    if error := plain_http_token_error(address, bool(_auth_headers()), args.insecure):
        raise CliError(error)  # before the slower checks; _client checks again
    validate_overrides(overrides, root / "conf")  # the conf/ that runs on the cluster
    try:
        files = upload_listing(root, NEVER_UPLOAD)
        size = f"{len(files)} files ({sum(f.stat().st_size for f in files):,} bytes)"
    except (ImportError, AttributeError, TypeError):  # Ray's private packaging API moved: see upload_listing
        size = "files (size unknown: this Ray's packaging API moved)"
    client = _client(address, args.insecure)
    never = f"never {' '.join(NEVER_UPLOAD)}, nor what its .gitignore / .rayignore name"
    print(f"uploading {size} from {root} ({never})", file=sys.stderr)
    runtime_env = {"working_dir": str(root), "excludes": list(NEVER_UPLOAD), "env_vars": env}
    entrypoint = "python jobs/train.py " + " ".join(shlex.quote(o) for o in overrides)
    job_id = _submit(client, entrypoint.strip(), runtime_env)
    print(job_id)
    if env:
        print(f"passed to the job: {', '.join(sorted(env))} (names only; values are not shown)", file=sys.stderr)
    if not args.wait:
        return 0
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
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

    try:
        meta = prepare(args.src, args.out, args.val_every)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    tokens, files, skipped = meta["tokens"], meta["files"], meta["skipped"]
    print(
        f"wrote {args.out}/train.bin ({tokens['train']:,} tokens from {files['train']} files), "
        f"val.bin ({tokens['val']:,} from {files['val']}); "
        f"skipped {skipped['hidden']} hidden and {skipped['binary']} binary files"
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
        out = export_hf_mixtral(args.checkpoint, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    weights = shards[0] if len(shards) == 1 else f"{len(shards)} shards + model.safetensors.index.json"
    print(f"wrote {out}/config.json and {weights} ({args.dtype}; load with MixtralForCausalLM.from_pretrained)")
    return 0


COMMANDS = {"export": cmd_export, "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "list": cmd_list, "prepare": cmd_prepare}


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
        return 2 if args.command in ("prepare", "export") else 1


if __name__ == "__main__":
    raise SystemExit(main())
