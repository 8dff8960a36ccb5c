"""What `moe-cluster submit` sends (files, variables, the token's scheme), checked without a cluster.

No test here sends traffic beyond loopback: the CLI tests block every other connection, and the
--insecure path is tested through the pure function only. The upload itself, on a real Ray head, is
tests/test_cli.py::test_submit_uploads_the_project_without_secrets.
"""

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_cluster import cli
from moe_cluster.submit import NEVER_UPLOAD, PASS_ENV, env_to_pass, plain_http_token_error, upload_listing, working_dir

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-not-real-5d41402abc4b2a76"


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_upload_listing_leaves_out_secrets_and_what_ignore_files_name(tmp_path):
    kept = {"jobs/train.py": "print()", "conf/config.yaml": "a: 1", "conf/data/stdlib.yaml": "b: 2",
            "notes.txt": "kept", ".rayignore": "*.log\n", ".gitignore": "notebooks/\n"}  # fmt: skip
    never = [".env", ".env.local", "key.pem", "conf/id.key", ".git/HEAD", ".venv/bin/python", "data/big.bin",
             "outputs/x", "wandb/x", "multirun/x", "jobs/__pycache__/train.pyc", "x.egg-info/PKG-INFO",
             "scratch/run.log", "notebooks/a.ipynb"]  # fmt: skip
    _write(tmp_path, kept | {name: "never" for name in never})
    files = upload_listing(tmp_path, NEVER_UPLOAD)
    assert {f.relative_to(tmp_path).as_posix() for f in files} == set(kept)


def test_variables_are_named_in_one_place_and_added_by_name():
    assert set(PASS_ENV) >= {"WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "HF_TOKEN"}
    environ = {"WANDB_API_KEY": "k", "WANDB_BASE_URL": "u", "HF_TOKEN": "h", "MY_TOKEN": "m", "OTHER": "o"}
    assert env_to_pass(["MY_TOKEN"], environ) == {"WANDB_API_KEY": "k", "WANDB_BASE_URL": "u", "HF_TOKEN": "h",
                                                  "MY_TOKEN": "m"}  # fmt: skip
    assert env_to_pass([], {"OTHER": "o"}) == {}
    with pytest.raises(ValueError, match="MY_TOKEN is not set in this environment"):
        env_to_pass(["MY_TOKEN"], {})
    with pytest.raises(ValueError, match="not an environment variable name"):
        env_to_pass(["1-BAD"], {"1-BAD": "x"})
    with pytest.raises(ValueError, match="Export MY_TOKEN in the environment") as refused:
        env_to_pass(["MY_TOKEN=s3cret-value"], {})
    assert "s3cret-value" not in str(refused.value)


def test_cli_env_errors_name_the_variable_not_its_value(capsys, monkeypatch):
    monkeypatch.delenv("MY_TOKEN", raising=False)
    monkeypatch.setenv("OTHER_TOKEN", "other-value")
    assert cli.main(["submit", "--env", "MY_TOKEN=s3cret-value", "--", "trainer.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "Export MY_TOKEN in the environment" in err and "s3cret-value" not in err
    assert cli.main(["submit", "--env", "OTHER_TOKEN", "--env", "MY_TOKEN", "--", "trainer.max_steps=1"]) == 1
    assert "--env MY_TOKEN: MY_TOKEN is not set" in capsys.readouterr().err


@pytest.mark.parametrize(
    "address, allowed",
    [("http://127.0.0.1:8265", True), ("http://127.5.5.5:8265", True), ("http://localhost:8265", True),
     ("http://[::1]:8265", True), ("127.0.0.1:8265", True), ("localhost:6379", True), ("auto", True),
     ("https://10.0.0.5:8265", True), ("https://head.example.com", True),
     ("http://10.0.0.5:8265", False), ("http://192.168.1.20:8265", False), ("http://172.16.0.1:8265", False),
     ("http://203.0.113.7:8265", False), ("http://head.example.com:8265", False), ("http://[fe80::1]:8265", False),
     ("10.0.0.5:8265", False), ("head:8265", False), ("ray://10.0.0.5:10001", False),
     ("http://localhost.example.com:8265", False), ("http://127.0.0.1.nip.io:8265", False)],
)  # fmt: skip
def test_token_goes_over_plain_http_only_to_loopback(address, allowed):
    error = plain_http_token_error(address, has_token=True, insecure=False)
    assert (error is None) == allowed, error
    if not allowed:
        assert "https://" in error and "--insecure" in error
    assert plain_http_token_error(address, has_token=True, insecure=True) is None
    assert plain_http_token_error(address, has_token=False, insecure=False) is None


def _loopback(host) -> bool:
    host = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch):
    """Connections and name look-ups beyond loopback are refused (and recorded) instead of made."""
    attempts = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, addr):
        if isinstance(addr, tuple) and not _loopback(addr[0]):
            attempts.append(addr)
            raise ConnectionRefusedError(f"test: no traffic to {addr}")
        return connect(sock, addr)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and not _loopback(host):
            attempts.append(host)
            raise socket.gaierror(f"test: no look-up of {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


def test_cli_refuses_to_send_the_token_in_clear_before_connecting(loopback_only, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    remote = "http://192.0.2.10:8265"  # TEST-NET-1: never reached, the fixture refuses it anyway
    for argv in (["submit", "--address", remote, "--", "trainer.max_steps=1"], ["list", "--address", remote],
                 ["status", "x", "--address", "192.0.2.10:8265"]):  # fmt: skip
        assert cli.main(argv) == 1
        out = capsys.readouterr()
        assert "refusing to send the cluster's auth token unencrypted" in out.err and "--insecure" in out.err
        assert TOKEN not in out.out + out.err
    assert loopback_only == []


def test_address_flag_wins_over_ray_address(loopback_only, capsys, monkeypatch):
    # Ray's client prefers $RAY_ADDRESS to the address it is given; the CLI checks and uses --address.
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("RAY_ADDRESS", "http://192.0.2.10:8265")
    port = _free_loopback_port()
    assert cli.main(["list", "--address", f"http://127.0.0.1:{port}"]) == 1
    assert f"cannot reach a Ray dashboard at http://127.0.0.1:{port}" in capsys.readouterr().err
    assert loopback_only == [] and os.environ["RAY_ADDRESS"] == "http://192.0.2.10:8265"


def test_working_dir_must_be_a_project_checkout(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert working_dir(None, ROOT) == ROOT  # the editable checkout
    with pytest.raises(ValueError, match="--working-dir pointing at a project checkout"):
        working_dir(None, tmp_path)  # an installed package: site-packages has no jobs/ or conf/
    _write(tmp_path, {"jobs/train.py": ""})
    with pytest.raises(ValueError, match="it has no conf/config.yaml"):
        working_dir(str(tmp_path), ROOT)
    _write(tmp_path, {"conf/config.yaml": ""})
    assert working_dir(str(tmp_path), ROOT) == tmp_path.resolve()
    # The overrides are validated against the working dir's own conf/ (here, an empty one).
    assert cli.main(["submit", "--working-dir", str(tmp_path), "--", "trainer.max_steps=1"]) == 1
    assert "invalid job configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_package_asks_for_a_checkout(tmp_path):
    # A non-editable install, built from a copy of the sources (no build/ left in the checkout).
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    for name in ("moe_cluster", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(site)}

    def run(*args):
        cmd = [sys.executable, *args]
        return subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)

    assert run("-c", "import moe_cluster; print(moe_cluster.__file__)").stdout.startswith(str(site))
    address = f"http://127.0.0.1:{_free_loopback_port()}"  # nothing listens: reaching it would say so
    out = run("-m", "moe_cluster.cli", "submit", "--address", address, "--", "trainer.max_steps=1")
    assert out.returncode == 1, out.stderr
    assert "--working-dir pointing at a project checkout" in out.stderr and "cannot reach" not in out.stderr
