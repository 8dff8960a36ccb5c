"""The embedded default starts a Ray of its own, whatever an earlier `ray start` left behind."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from moe_cluster.train.launch import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONNECT = """
import ray
from moe_cluster.cluster.launch import connect
from moe_cluster.config import JobConfig
connect(JobConfig())
print("CPUs", ray.cluster_resources()["CPU"])
ray.shutdown()
"""


def test_a_dead_cluster_left_in_the_ray_temp_dir_is_not_joined():
    # A cluster started by `ray start` and since gone leaves its address in
    # <ray temp dir>/ray_current_cluster; plain ray.init(num_cpus=...) would try to join it and fail
    # ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided").
    # A short RAY_TMPDIR keeps Ray's socket paths under the Unix limit and the machine's /tmp/ray untouched.
    with tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as tmp:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        out = subprocess.run([sys.executable, "-c", CONNECT], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPUs 2.0" in out.stdout  # the embedded default: one CPU per worker, two workers
