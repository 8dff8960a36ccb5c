"""jobs/train.py end to end: a run whose driver is SIGKILLed resumes when relaunched."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.helpers import OVERRIDES, losses, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _launch(run_dir, *extra):
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), *OVERRIDES, f"run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _steps_logged(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_driver_killed_then_relaunched_with_resume(tmp_path):
    reference = tmp_path / "reference"
    out, _ = _launch(reference).communicate(timeout=300)
    assert "done: 30 steps" in out, out

    run = tmp_path / "run"
    driver = _launch(run)
    wait_for(lambda: _steps_logged(run) >= 12, 240, "12 steps")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its embedded Ray, all at once
    driver.wait()

    again = _launch(run)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 1 and "pass resume=true" in out  # nothing is overwritten by accident
    assert "Started a local Ray instance" not in out  # refused before Ray starts
    relaunched = _launch(run, "resume=true")
    out, _ = relaunched.communicate(timeout=300)
    assert relaunched.returncode == 0, out
    assert losses(run) == losses(reference)


def test_two_jobs_in_one_run_directory_the_second_is_refused(tmp_path):
    """Two jobs started with one run_dir: the second stops before Ray starts, naming the first; the
    first runs on alone (one line per step in metrics.jsonl, not two jobs' lines interleaved)."""
    run = tmp_path / "run"
    first = _launch(run)
    wait_for(lambda: (run / "events.jsonl").exists(), 240, "the first job to start")
    second = _launch(run, "resume=true")  # even resume=true: the directory is in use
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 1 and f"is in use by another job (pid {first.pid}" in out, out
    assert "Started a local Ray instance" not in out
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "done: 30 steps" in out, out
    assert list(losses(run)) == list(range(1, 31))
