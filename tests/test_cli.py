"""moe-cluster submit / status / logs / stop / list against a real Ray head on loopback."""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from moe_cluster.train.launch import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's ray CLI, PATH or not
ROOT = Path(__file__).resolve().parents[1]

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
    from moe_cluster.dashboard import connect  # the CLI's own client: it carries the cluster's auth token

    env_vars = connect(head).get_job_info(job_id).runtime_env["env_vars"]
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


def test_submit_uploads_the_project_without_secrets(head, tmp_path):
    # A working dir: the project's conf/ and jobs/, a normal file passed with --include, and what must
    # never be uploaded (outside the allow-list, or left out by rule inside it).
    wd, run_dir, staging_tmp = tmp_path / "wd", tmp_path / "run", tmp_path / "tmp"
    for name in ("conf", "jobs"):
        shutil.copytree(ROOT / name, wd / name, ignore=shutil.ignore_patterns("__pycache__"))
    wandb_key, my_token = f"wandb-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    files = {"notes.txt": uuid.uuid4().hex,  # kept: --include
             ".env": f"WANDB_API_KEY={wandb_key}\n", "key.pem": "pem", "id_rsa": "key", ".aws/credentials": "x",
             "data/big.bin": "0" * 10**5, "outputs/x": "x", "wandb/x": "x", ".venv/x": "x", ".git/x": "x",
             "scratch.log": "x", ".rayignore": "*.log\n", ".gitignore": "notebooks/\n", "notebooks/a": "x",
             "jobs/__pycache__/old.pyc": "x", "conf/data/tokens.bin": "0" * 10**4,
             "jobs/checkpoints/step_00000003/COMMITTED": ""}  # fmt: skip
    for name, text in files.items():
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text(text)
    kept = {p.relative_to(wd).as_posix() for d in ("conf", "jobs") for p in (wd / d).rglob("*") if p.is_file()}
    kept = {f for f in kept if f not in files} | {"notes.txt"}

    secrets = {"WANDB_API_KEY": wandb_key, "MY_TOKEN": my_token, "WANDB_MODE": "disabled"}
    staging_tmp.mkdir()  # the staging folder is made here, so that its removal can be checked
    out = cli("submit", "--working-dir", str(wd), "--include", "notes.txt", "--env", "MY_TOKEN", "--wait", "--",
              *JOB, f"run_dir={run_dir}", address=head, extra_env=secrets | {"TMPDIR": str(staging_tmp)})  # fmt: skip
    job_id = out.stdout.splitlines()[0]
    assert f"{job_id}: SUCCEEDED" in out.stdout
    assert "MY_TOKEN" in out.stderr and "WANDB_API_KEY" in out.stderr  # names only
    count, size = re.search(r"uploading (\d+) files \(([\d,]+) bytes\)", out.stderr).groups()
    assert int(count) == len(kept) and int(size.replace(",", "")) == sum((wd / f).stat().st_size for f in kept)
    assert "left out by rule:" in out.stderr and not list(staging_tmp.glob("moe-cluster-upload-*"))

    from moe_cluster.dashboard import connect  # the CLI's own client: it carries the cluster's auth token

    runtime_env = connect(head).get_job_info(job_id).runtime_env  # the cluster's job record, not a log
    assert {k: runtime_env["env_vars"].get(k) for k in secrets} == secrets
    # The package as the head unpacked it (runtime_resources/working_dir_files/_ray_pkg_<hash>).
    pkg = runtime_env["working_dir"].rsplit("/", 1)[-1].removesuffix(".zip")
    pattern = f"ray/session_*/runtime_resources/working_dir_files/{pkg}"  # session_latest is a link
    (unpacked,) = {Path(p).resolve() for d in {tempfile.gettempdir(), "/tmp"} for p in glob.glob(f"{d}/{pattern}")}
    there = {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()}
    # The job itself writes Hydra's outputs/DATE/TIME/ there, and maybe __pycache__/.
    assert {f for f in there if not f.startswith("outputs/") and "__pycache__" not in f} == kept
    assert "outputs/x" not in there

    logs = cli("logs", job_id, address=head).stdout
    assert "done: 6 steps" in logs
    # Not checked: Ray's own runtime_env_agent.log records env_vars with their values (README says so).
    written = [p.read_bytes() for d in (run_dir, unpacked) for p in d.rglob("*") if p.is_file()]
    for value in (wandb_key, my_token):
        assert value not in out.stdout + out.stderr and value not in logs
        assert not [b for b in written if value.encode() in b]
