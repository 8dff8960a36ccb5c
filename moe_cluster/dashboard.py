"""The Ray dashboard's job client, as ``moe-cluster submit|status|logs|stop|list`` use it.

The cluster address comes from ``--address``, else ``RAY_ADDRESS``, else the local default. The
token (auth.py) travels in a header, never printed, and over plain http only to loopback unless
``--insecure``. What submit uploads and passes is submit.py's. No torch here: these commands start
in a fraction of a second.
"""

from __future__ import annotations

import os
import sys
import time

from .auth import auth_token, plain_http_token_error

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class DashboardError(Exception):
    """The dashboard cannot be used as asked: unreachable, refused the job, no such job (one line)."""


def resolve_address(given: str | None) -> str:
    return given or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str, insecure: bool = False):
    """A client for `address`, refused before connecting when the token would travel in clear."""
    headers = auth_headers()
    if error := plain_http_token_error(address, bool(headers), insecure):
        raise DashboardError(error)
    from ray.job_submission import JobSubmissionClient

    # Ray lets these variables override the address it is given: hide them while it resolves, so
    # the client talks to the address chosen (and checked) here.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # ConnectionError, or an HTTP error from a wrong endpoint
        raise DashboardError(
            f"cannot reach a Ray dashboard at {address} ({str(exc).splitlines()[0][:200]}); start one with "
            f"`ray start --head`, or pass --address / set RAY_ADDRESS"
        ) from None
    finally:
        os.environ.update(hidden)


def job_info(client, job_id: str, address: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise DashboardError(f"no job with id {job_id!r} at {address}; `moe-cluster list` shows the jobs") from None
        raise


def submit_job(client, entrypoint: str, runtime_env: dict, wait_s: float = 60.0) -> str:
    """Submit, waiting up to ``wait_s`` for a cluster that is still starting: its dashboard answers
    before its job agent does ("No available agent to submit job, please try again later")."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise DashboardError(f"the cluster refused the job: {str(exc).splitlines()[0][:300]}") from None
            time.sleep(1.0)


def wait_for_end(client, job_id: str) -> None:
    while str(client.get_job_status(job_id).value) not in TERMINAL:
        time.sleep(1)


def report_end(client, job_id: str, address: str) -> int:
    """Print how the job ended (a failed job's exit code, message and last 20 log lines to stderr);
    the exit status for it: 0 only when it succeeded."""
    info = job_info(client, job_id, address)
    status = str(info.status.value)
    print(f"{job_id}: {status}")
    if status == "FAILED":
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-20:])
        code = getattr(info, "driver_exit_code", None)
        print(f"the job failed (exit code {code}): {info.message}\n--- last lines of its log ---\n{tail}",
              file=sys.stderr)  # fmt: skip
    return 0 if status == "SUCCEEDED" else 1
