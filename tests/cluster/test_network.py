"""The job's own sockets listen on the node's cluster address, and the token is never sent in clear.

The binding is checked in a fresh process (the interface choice is per process), on 127.0.0.1,
against what torch does without it: a TCPStore on every interface and gloo on the address the
host name resolves to. The workers of a real job are checked in tests/cluster/test_faults.py
(test_sigkill_worker_recovers_with_nothing_lost).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_cluster.cluster.launch import check_token_transport
from moe_cluster.cluster.network import interface_of, local_addresses

PROBE = textwrap.dedent("""
    import datetime, json, sys
    import psutil
    import torch.distributed as dist
    from moe_cluster.cluster import network

    bind = sys.argv[1] == "bind"
    timeout = datetime.timedelta(seconds=30)
    if bind:
        network.bind_collectives("127.0.0.1")
        listener = network.listening_socket("127.0.0.1")
        store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], 1, is_master=True, wait_for_workers=False,
                              timeout=timeout, master_listen_fd=listener.detach())
    else:  # what torch does on its own
        store = dist.TCPStore("0.0.0.0", 0, 1, is_master=True, wait_for_workers=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    dist.new_group([0])
    listening = sorted({c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"})
    print(json.dumps(listening))
""")


def _listening(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_store_and_groups_listen_on_the_given_address_only():
    assert _listening("bind") == ["127.0.0.1"]
    assert _listening("plain") != ["127.0.0.1"]  # torch alone listens elsewhere too: the test can tell


def test_the_interface_of_an_address():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None
    assert "127.0.0.1" in local_addresses()


@pytest.mark.parametrize(
    "address, refused",
    [("ray://203.0.113.7:10001", True), ("203.0.113.7:6379", True), ("http://203.0.113.7:8265", True),
     ("ray://127.0.0.1:10001", False), ("127.0.0.1:6379", False), ("auto", False), ("https://head.example:8265", False)],
)  # fmt: skip
def test_jobs_refuse_to_send_the_token_in_clear_as_submit_does(address, refused, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-not-real")
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    if refused:
        with pytest.raises(ValueError, match=r"auth token unencrypted.*cluster.insecure=true"):
            check_token_transport(address, insecure=False)
        check_token_transport(address, insecure=True)  # the user's explicit choice
        monkeypatch.setenv("RAY_USE_TLS", "1")
        check_token_transport(address, insecure=False)  # Ray's TLS encrypts it
    else:
        check_token_transport(address, insecure=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/auth_token")
    check_token_transport(address, insecure=False)  # no token, nothing to leak


def test_a_drivers_own_node_address_is_not_beyond_this_machine(monkeypatch):
    """A job's driver on the head reaches its GCS at the head's address (RAY_ADDRESS): not refused."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-not-real")
    own = next((a for a in local_addresses() if a != "127.0.0.1" and ":" not in a), None)
    if own is None:
        pytest.skip("this machine has no address but loopback")
    check_token_transport(f"{own}:6379", insecure=False)


def test_train_py_refuses_a_ray_address_in_clear_before_connecting(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "jobs" / "train.py"), "cluster.address=ray://203.0.113.7:10001",
         f"run_dir={tmp_path}", "trainer.max_steps=1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_TOKEN": "tok-not-real"},
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "auth token unencrypted" in out.stderr and "tok-not-real" not in out.stdout + out.stderr
