"""moe-cluster submit / status / logs / stop / list against a real Ray head on loopback."""

import os
import re
import subprocess
import sys
import time

import pytest

from moe_cluster.train.launch import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's ray CLI, PATH or not

pytestmark = [pytest.mark.ray, pytest.mark.slow]

JOB = ["experiment=debug", "trainer.max_steps=6", "trainer.eval_every=0", "trainer.checkpoint_every=3",
       "data.max_bytes=400000", "logger.plots=false"]  # fmt: skip


def cli(*args, address=None, check=True, extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    env.pop("RAY_ADDRESS", None)
    command, rest = args[0], list(args[1:])
    cmd = [sys.executable, "-m", "moe_cluster.cli", command] + (["--address", address] if address else []) + rest
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def head():
    port, dash = free_port(), free_port()
    # Jobs run `python jobs/train.py` on the cluster: its `python` must be this environment's.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=2", "--disable-usage-stats"],
        check=True, capture_output=True, timeout=120, env=env,
    )  # fmt: skip
    yield f"http://127.0.0.1:{dash}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def _status(job_id, address):
    out = cli("status", job_id, address=address, check=False).stdout
    return out.split(": ", 1)[1].split()[0] if ": " in out else ""


def test_submit_wait_logs_stop_list(head):
    # A tiny job with overrides runs to the end, with the submitter's wandb / HF variables.
    passed = {"WANDB_MODE": "disabled", "HF_TOKEN": "hf_not_a_real_token"}
    out = cli("submit", "--wait", "--", *JOB, address=head, extra_env=passed)
    job_id = out.stdout.splitlines()[0]
    assert f"{job_id}: SUCCEEDED" in out.stdout
    from moe_cluster.cli import _client  # the CLI's own client: it carries the cluster's auth token

    env_vars = _client(head).get_job_info(job_id).runtime_env["env_vars"]
    assert {k: env_vars.get(k) for k in passed} == passed
    logs = cli("logs", job_id, address=head).stdout
    assert "done: 6 steps" in logs and "run directory:" in logs and "step      6/6" in logs
    assert "done: 6 steps" in cli("logs", job_id, "--follow", address=head).stdout  # ends with the job

    # A long job is stopped.
    long_id = cli("submit", "--", "trainer.max_steps=100000", *JOB[2:], address=head).stdout.splitlines()[0]
    deadline = time.monotonic() + 120
    while _status(long_id, head) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
    assert "stop requested" in cli("stop", long_id, address=head).stdout
    while _status(long_id, head) not in ("STOPPED", "FAILED") and time.monotonic() < deadline:
        time.sleep(1)
    assert _status(long_id, head) == "STOPPED"

    listing = cli("list", address=head).stdout
    assert re.search(rf"{job_id}\s+SUCCEEDED", listing) and re.search(rf"{long_id}\s+STOPPED", listing)


def test_clear_errors(head):
    bad = cli("submit", "--", "trainer.max_stepz=3", address=head, check=False)
    assert bad.returncode == 1 and "invalid job configuration" in bad.stderr and "max_stepz" in bad.stderr
    unknown = cli("status", "raysubmit_nosuchjob", address=head, check=False)
    assert unknown.returncode == 1 and "no job with id 'raysubmit_nosuchjob'" in unknown.stderr
    unreachable = cli("list", address=f"http://127.0.0.1:{free_port()}", check=False)
    assert unreachable.returncode == 1 and "cannot reach a Ray dashboard" in unreachable.stderr


def test_failed_job_reports_exit_code_and_log_tail(head):
    # Valid for Hydra, impossible for the cluster: 8 workers on a 2-CPU head.
    out = cli("submit", "--wait", "--", *JOB, "cluster.num_workers=8", "trainer.global_batch_size=16", address=head, check=False)
    assert out.returncode == 1
    assert "the job failed (exit code 1)" in out.stderr and "needs 8 CPUs but the Ray cluster has 2" in out.stderr
