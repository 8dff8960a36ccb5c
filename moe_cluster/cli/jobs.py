"""``moe-cluster submit|status|logs|stop|list``: jobs on a Ray cluster, through its dashboard.

The client and its auth: dashboard.py. What submit uploads (an allow-list, staged in a temporary
folder) and passes: submit.py. No torch: these commands start in a fraction of a second.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .. import dashboard
from ..auth import plain_http_token_error
from ..dashboard import DEFAULT_ADDRESS, resolve_address
from ..submit import (
    ALLOWED, PASS_ENV, env_to_pass, left_out_summary, refusal_error, stage, upload_listing, working_dir,
)  # fmt: skip
from .errors import CliError

# The source tree in an editable install (conf/ and jobs/ live here); site-packages otherwise.
ROOT = Path(__file__).resolve().parents[2]
ERROR_STATUS = 1  # a CliError here: the cluster or the job said no


def validate_overrides(overrides: list[str], conf_dir: Path = ROOT / "conf") -> None:
    """Compose `conf_dir` with the overrides and validate the job, here, before anything is sent."""
    from ..config import compose, validate

    try:
        job = compose(overrides, conf_dir)
        # Files the job reads (data.path, model.init_from, a DeepSpeed JSON) may exist only on the
        # cluster: they are read and checked there, by jobs/train.py, before any worker starts.
        validate(job, files=False)
        from ..plan import check_memory  # imports torch (the meta-device model)

        # Against the job's cluster.* memory (here=False), not this machine's: it runs on the cluster.
        check_memory(job, None, here=False)
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
    address = resolve_address(args.address)
    if error := plain_http_token_error(address, bool(dashboard.auth_headers()), args.insecure):
        raise CliError(error)  # before the slower checks; dashboard.connect checks again
    validate_overrides(overrides, root / "conf")  # the conf/ that runs on the cluster
    client = dashboard.connect(address, args.insecure)
    if summary := left_out_summary(listing):
        print(summary, file=sys.stderr)
    print(f"uploading {len(listing.files)} files ({listing.size:,} bytes) from {root}", file=sys.stderr)
    entrypoint = "python jobs/train.py " + " ".join(shlex.quote(o) for o in overrides)
    # The job's working_dir is a copy of exactly the listed files: Ray packs and uploads it within
    # submit_job, so the copy can go as soon as that returns.
    with tempfile.TemporaryDirectory(prefix="moe-cluster-upload-") as staging:
        stage(root, listing.files, Path(staging))
        job_id = dashboard.submit_job(client, entrypoint.strip(), {"working_dir": staging, "env_vars": env})
    print(job_id)
    if env:
        print(f"passed to the job: {', '.join(sorted(env))} (names only; values are not shown)", file=sys.stderr)
    if not args.wait:
        return 0
    dashboard.wait_for_end(client, job_id)
    return dashboard.report_end(client, job_id, address)


def cmd_status(args) -> int:
    address = resolve_address(args.address)
    client = dashboard.connect(address, args.insecure)
    info = dashboard.job_info(client, args.id, address)
    status = str(info.status.value)
    if status == "FAILED":
        return dashboard.report_end(client, args.id, address)
    print(f"{args.id}: {status}" + (f" ({info.message})" if info.message else ""))
    return 0


def cmd_logs(args) -> int:
    address = resolve_address(args.address)
    client = dashboard.connect(address, args.insecure)
    dashboard.job_info(client, args.id, address)
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
    address = resolve_address(args.address)
    client = dashboard.connect(address, args.insecure)
    dashboard.job_info(client, args.id, address)
    stopped = client.stop_job(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'already ended'}")
    return 0


def cmd_list(args) -> int:
    client = dashboard.connect(resolve_address(args.address), args.insecure)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'ID':<28} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        print(f"{(j.submission_id or j.job_id or '-'):<28} {str(j.status.value):<10} {started:<19} {j.entrypoint[:80]}")
    return 0


def _with_address(p, func):
    p.add_argument("--address", help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument(
        "--insecure", action="store_true", help="allow sending the auth token over plain http beyond loopback"
    )
    p.set_defaults(func=func, error_status=ERROR_STATUS)
    return p


def add_submit(sub) -> None:
    p = _with_address(sub.add_parser("submit", help="validate overrides, submit jobs/train.py to a Ray cluster"),
                      cmd_submit)  # fmt: skip
    p.add_argument("--working-dir", help="project checkout the job's files come from (default: this source tree)")
    p.add_argument(
        "--include", action="append", default=[], metavar="PATH",
        help=f"also upload this file or folder, relative to the working dir (repeatable; always uploaded: "
             f"{', '.join(ALLOWED)}; keys and credentials are refused either way)",
    )  # fmt: skip
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME",
        help=f"also pass this environment variable's value (repeatable; always passed when set: {', '.join(PASS_ENV)})",
    )  # fmt: skip
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit non-zero unless it succeeded")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for jobs/train.py (after --)")


def add_status(sub) -> None:
    _with_address(sub.add_parser("status", help="a job's status"), cmd_status).add_argument("id")


def add_logs(sub) -> None:
    p = _with_address(sub.add_parser("logs", help="a job's logs"), cmd_logs)
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def add_stop(sub) -> None:
    _with_address(sub.add_parser("stop", help="stop a job"), cmd_stop).add_argument("id")


def add_list(sub) -> None:
    _with_address(sub.add_parser("list", help="the cluster's jobs"), cmd_list)


COMMANDS = {"submit": add_submit, "status": add_status, "logs": add_logs, "stop": add_stop, "list": add_list}
