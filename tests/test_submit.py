"""What `moe-cluster submit` sends (files, variables, the token's scheme), checked without a cluster.

No test here sends traffic beyond loopback: the CLI tests block every other connection, and the
--insecure path is tested through the pure function only. The CLI tests that get as far as
submitting hand the job to a fake client, which records the staged working_dir. The upload itself,
on a real Ray head, is tests/test_cli.py::test_submit_uploads_the_project_without_secrets.
"""

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_cluster import cli, dashboard
from moe_cluster.auth import plain_http_token_error
from moe_cluster.submit import (
    PASS_ENV, env_to_pass, left_out_summary, looks_secret, upload_listing, working_dir,
)  # fmt: skip

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


def _paths(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_upload_listing_leaves_out_secrets_and_what_is_not_allowed(tmp_path):
    # conf/data/ is a config group and moe_cluster/data/ a package: a folder named data/ inside an
    # allowed folder is uploaded; its data files are not.
    kept = {"jobs/train.py": "print()", "conf/config.yaml": "a: 1", "conf/data/stdlib.yaml": "b: 2",
            "moe_cluster/data/corpus.py": "", "kernels/ops.py": "", "pyproject.toml": "", "README.md": ""}  # fmt: skip
    never = [".env", ".env.local", "key.pem", ".git/HEAD", ".venv/bin/python", "data/big.bin", "outputs/x",
             "wandb/x", "multirun/x", "jobs/__pycache__/train.pyc", "x.egg-info/PKG-INFO", "scratch/run.log",
             "notebooks/a.ipynb", "notes.txt", ".rayignore", ".gitignore",
             # inside allowed folders, left out by rule
             "moe_cluster/x.egg-info/PKG-INFO", "moe_cluster/train/__pycache__/a.pyc", "kernels/old.pyc",
             "conf/.gitignore", "jobs/outputs/2024-01-01/x", "jobs/wandb/run/x", "kernels/.git",
             "conf/data/tokens.bin", "conf/w.safetensors", "conf/a.npy", "conf/t.parquet", "conf/m.pt",
             "jobs/checkpoints/step_00000010/x", "jobs/step_00000020/COMMITTED", "jobs/step_00000020/meta.json",
             "conf/__0_0.distcp"]  # fmt: skip
    _write(tmp_path, kept | {name: "never" for name in never})
    listing = upload_listing(tmp_path)
    assert set(listing.files) == set(kept) and listing.refused == ()
    assert listing.size == sum(len(text) for text in kept.values())
    # A .gitignore is neither obeyed nor uploaded: Ray would obey it while packing the staging folder.
    (tmp_path / "conf/ignored.yaml").write_text("c: 3")
    _write(tmp_path, {"conf/.gitignore": "ignored.yaml\n"})
    assert "conf/ignored.yaml" in upload_listing(tmp_path).files
    left = upload_listing(tmp_path).left_out
    assert left["not in the allow-list"] == (".env", ".env.local", ".git/", ".gitignore", ".rayignore", ".venv/",
                                             "data/", "key.pem", "multirun/", "notebooks/", "notes.txt", "outputs/",
                                             "scratch/", "wandb/", "x.egg-info/")  # fmt: skip
    assert left["checkpoint folder"] == ("jobs/checkpoints/", "jobs/step_00000020/")
    assert set(left["data file"]) == {"conf/data/tokens.bin", "conf/w.safetensors", "conf/a.npy", "conf/t.parquet",
                                      "conf/m.pt"}  # fmt: skip


def test_include_adds_files_and_folders_and_wins_over_the_rules(tmp_path):
    _write(tmp_path, {"jobs/train.py": "", "conf/config.yaml": "", "notes.txt": "n", "extra/a.py": "a",
                      "extra/__pycache__/a.pyc": "", "extra/w.bin": "", "tokenizer.bin": "t"})  # fmt: skip
    listing = upload_listing(tmp_path, ["notes.txt", "extra", str(tmp_path / "tokenizer.bin")])
    # A file named on its own is taken as named; inside an included folder the rules still apply.
    assert set(listing.files) == {"jobs/train.py", "conf/config.yaml", "notes.txt", "extra/a.py", "tokenizer.bin"}
    assert "not in the allow-list" not in listing.left_out  # all three were included
    assert listing.left_out == {"__pycache__": ("extra/__pycache__/",), "data file": ("extra/w.bin",)}
    (tmp_path.parent / "outside.txt").write_text("o")
    (tmp_path / "link.txt").symlink_to(tmp_path.parent / "outside.txt")
    for given, message in [("../outside.txt", "outside the working dir"), (str(tmp_path.parent), "outside"),
                           ("link.txt", "outside the working dir"), ("nope.txt", "there is no"),
                           (".", "names the whole working dir")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            upload_listing(tmp_path, [given])


def test_links_are_judged_by_where_they_point(tmp_path):
    _write(tmp_path, {"jobs/train.py": "", "conf/config.yaml": "", ".ssh/id_rsa": "k", "shared.yaml": "s"})
    (tmp_path.parent / "elsewhere.yaml").write_text("e")
    (tmp_path / "conf/innocent.yaml").symlink_to(tmp_path / ".ssh/id_rsa")
    (tmp_path / "conf/shared.yaml").symlink_to(tmp_path / "shared.yaml")
    (tmp_path / "conf/far.yaml").symlink_to(tmp_path.parent / "elsewhere.yaml")
    (tmp_path / "conf/home").symlink_to(tmp_path / ".ssh", target_is_directory=True)
    listing = upload_listing(tmp_path)
    assert listing.refused == (("conf/innocent.yaml", "inside a .ssh/ folder"),)
    assert "conf/shared.yaml" in listing.files and "conf/far.yaml" not in listing.files
    assert listing.left_out["link out of the working dir"] == ("conf/far.yaml",)
    assert listing.left_out["link to a folder (not followed)"] == ("conf/home/",)


# Fake keys; MARKERS are their secret parts, which no output may show.
MARKERS = ("b3BlbnNzaC1rZXktdjEAAAAAfake", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "fakeGcpKey")
PEM = "-----BEGIN " + f"OPENSSH PRIVATE KEY-----\n{MARKERS[0]}\n-----END OPENSSH PRIVATE KEY-----\n"
AWS = "[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = " + MARKERS[1] + "\n"
GCP = '{"type": "service_account", "project_id": "p", "private_key_id": "1", "private_key": "fakeGcpKey"}'
# What submit met in project folders: planted at the top of a checkout, none may be uploaded.
FOUND = {"id_rsa": PEM, "id_ed25519": PEM, ".ssh/id_ecdsa": PEM, ".ssh/config": "Host x", ".netrc": "machine x",
         ".git-credentials": "https://u:p@x", ".aws/credentials": AWS, "credentials.json": GCP,
         "my-project-service-account-1234.json": GCP, ".ray/auth_token": "tok", "kubeconfig": "apiVersion: v1",
         ".npmrc": "//registry/:_authToken=x", ".pypirc": "[pypi]", "cert.p12": "p12", "secrets.yaml": "k: v",
         "runs/x/checkpoints/step_00000010/COMMITTED": "", "runs/x/checkpoints/step_00000010/__0_0.distcp": "w",
         "foo/data/train.bin": "0" * 1000, "foo/data/val.bin": "0"}  # fmt: skip


def test_credentials_are_refused_by_name_folder_and_content(tmp_path):
    texts = {"conf/aws.ini": AWS, "conf/gcp.json": GCP, "conf/hf.yaml": "token: hf_" + "a1B2" * 8 + "cD"}
    for rel, why in [("conf/secrets.yml", "secrets.y*ml"), ("conf/.env.prod", ".env.*"), ("jobs/key.pem", "*.pem"),
                     ("conf/id_ed25519.old", "id_ed25519*"), ("conf/.kube/config", "inside a .kube/ folder"),
                     ("conf/cluster/head.yaml", "a private key"), ("conf/aws.ini", "an AWS secret access key"),
                     ("conf/gcp.json", "a service-account key"), ("conf/hf.yaml", "a Hugging Face token")]:  # fmt: skip
        _write(tmp_path, {rel: texts.get(rel, PEM)})
        assert why in looks_secret(tmp_path, rel), rel
    _write(tmp_path, {"conf/plain.json": GCP.replace('"private_key"', '"client_email"'), "conf/doc.md": "PRIVATE KEY"})
    assert looks_secret(tmp_path, "conf/plain.json") is None and looks_secret(tmp_path, "conf/doc.md") is None


def test_this_checkout_uploads_without_refusal():
    # The patterns are written so that submit.py itself, and the rest of this checkout, do not match.
    listing = upload_listing(ROOT)
    assert listing.refused == ()
    assert {"moe_cluster/submit.py", "moe_cluster/dashboard.py", "moe_cluster/cli/__init__.py",
            "moe_cluster/cli/jobs.py", "jobs/train.py", "conf/config.yaml", "pyproject.toml",
            "README.md"} <= set(listing.files)  # fmt: skip
    assert not [f for f in listing.files if f.startswith(("tests/", "docs/", ".git/")) or "__pycache__" in f]


def test_left_out_summary_is_short():
    from moe_cluster.submit import Listing

    listing = Listing(files=(), size=0, left_out={"not in the allow-list": tuple(f"f{i}" for i in range(8)),
                                                  "__pycache__": ("jobs/__pycache__/",)}, refused=())  # fmt: skip
    assert left_out_summary(listing).splitlines() == [
        "left out by rule: 9 paths (a folder counts once; --include PATH adds one back)",
        "  not in the allow-list (8): f0, f1, f2, f3, f4, +3 more",
        "  __pycache__ (1): jobs/__pycache__/",
    ]
    assert left_out_summary(Listing(files=(), size=0, left_out={}, refused=())) == ""


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


class FakeClient:
    """Stands in for JobSubmissionClient: records what the staged working_dir held at submit_job."""

    def __init__(self):
        self.staged, self.staging = None, None

    def submit_job(self, entrypoint, runtime_env):
        self.staging = Path(runtime_env["working_dir"])
        self.staged = {p.relative_to(self.staging).as_posix(): p.read_bytes() for p in self.staging.rglob("*")
                       if p.is_file()}  # fmt: skip
        return "raysubmit_fake"


@pytest.fixture
def fake_client(monkeypatch):
    """dashboard.connect returns a FakeClient; `calls` counts how often it was asked for one."""
    client, calls = FakeClient(), []

    def make(address, insecure=False):
        calls.append(address)
        return client

    monkeypatch.setattr(dashboard, "connect", make)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    client.calls = calls
    return client


def _checkout(root: Path) -> Path:
    """A project checkout: this repo's conf/ and jobs/ (the overrides are validated against them)."""
    for name in ("conf", "jobs"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_submit_uploads_none_of_what_was_found_in_project_folders(tmp_path, loopback_only, fake_client, capsys):
    wd = _checkout(tmp_path / "wd")
    _write(wd, FOUND | {"notes.txt": "n", "jobs/__pycache__/train.cpython-312.pyc": "", "extra.md": "e"})
    address = f"http://127.0.0.1:{_free_loopback_port()}"
    argv = ["submit", "--address", address, "--working-dir", str(wd), "--include", "extra.md", "--",
            "trainer.max_steps=1"]  # fmt: skip
    assert cli.main(argv) == 0
    expected = {p.relative_to(wd).as_posix() for d in ("conf", "jobs") for p in (wd / d).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts} | {"extra.md"}  # fmt: skip
    assert set(fake_client.staged) == expected
    assert not set(FOUND) & set(fake_client.staged) and "notes.txt" not in fake_client.staged
    assert all(fake_client.staged[f] == (wd / f).read_bytes() for f in expected)
    assert not fake_client.staging.exists()  # removed once submit_job returned
    out = capsys.readouterr()
    assert out.out.strip() == "raysubmit_fake" and loopback_only == []
    size = sum((wd / f).stat().st_size for f in expected)
    assert f"uploading {len(expected)} files ({size:,} bytes) from {wd}" in out.err
    summary = out.err.split("uploading")[0]
    assert "left out by rule:" in summary and "  __pycache__ (1): jobs/__pycache__/" in summary
    assert "  not in the allow-list (" in summary and ".aws/" in summary and "+" in summary
    assert not [m for m in MARKERS if m in out.err]


@pytest.mark.parametrize(
    "planted, include",
    [("conf/secrets.yaml", []), ("jobs/.env", []), ("conf/.ray/auth_token", []), ("conf/cluster/head.yaml", []),
     ("conf/aws.ini", []), ("conf/gcp.json", []), ("id_ed25519", ["id_ed25519"]), (".aws/credentials", [".aws"]),
     ("keys/deploy.p12", ["keys"]), ("my-service-account.json", ["my-service-account.json"])],
)  # fmt: skip
def test_submit_refuses_credentials_before_contacting_the_cluster(planted, include, tmp_path, loopback_only,
                                                                  fake_client, capsys):  # fmt: skip
    wd = tmp_path / "wd"
    text = {"conf/aws.ini": AWS, "conf/gcp.json": GCP, "my-service-account.json": GCP, ".aws/credentials": AWS}
    _write(wd, {"jobs/train.py": "", "conf/config.yaml": "", planted: text.get(planted, PEM)})
    address = f"http://127.0.0.1:{_free_loopback_port()}"  # nothing listens: reaching it would say so
    argv = ["submit", "--address", address, "--working-dir", str(wd)]
    argv += [a for path in include for a in ("--include", path)] + ["--", "trainer.max_steps=1"]
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    assert f"refusing to upload what looks like keys or credentials from {wd}: {planted} (" in out.err
    assert "Nothing was sent. Move each out of the uploaded folders" in out.err
    assert fake_client.calls == [] and fake_client.staged is None and loopback_only == []
    assert "uploading" not in out.err and not [m for m in MARKERS if m in out.out + out.err]


def test_submit_include_must_name_a_path_inside_the_working_dir(tmp_path, loopback_only, fake_client, capsys):
    wd = tmp_path / "wd"
    _write(wd, {"jobs/train.py": "", "conf/config.yaml": ""})
    (tmp_path / "elsewhere.txt").write_text("e")
    for given, message in [("../elsewhere.txt", "--include ../elsewhere.txt: that is outside the working dir"),
                           ("missing.txt", "--include missing.txt: there is no")]:  # fmt: skip
        assert cli.main(["submit", "--working-dir", str(wd), "--include", given, "--", "trainer.max_steps=1"]) == 1
        assert message in capsys.readouterr().err
    assert fake_client.calls == [] and loopback_only == []


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


def test_an_allowed_folder_that_is_a_link_out_of_the_project_is_not_followed(tmp_path):
    """conf -> ../elsewhere would upload whatever lies there (a home folder, say): left out, by rule."""
    outside = tmp_path / "elsewhere"
    _write(outside, {"config.yaml": "a: 1", "private.yaml": "token: x"})
    root = tmp_path / "project"
    _write(root, {"jobs/train.py": "print()", "moe_cluster/__init__.py": ""})
    (root / "conf").symlink_to(outside, target_is_directory=True)
    listing = upload_listing(root)
    assert not any(f.startswith("conf") for f in listing.files)
    assert any("conf" in paths for paths in listing.left_out.values())


def test_a_wandb_key_in_an_uploaded_file_is_refused(tmp_path):
    _write(tmp_path, {"jobs/train.py": "print()", "conf/config.yaml": "a: 1",
                      "conf/logger/mine.yaml": "wandb_api_key: " + "0123456789abcdef" * 2 + "01234567\n"})  # fmt: skip
    assert [rel for rel, _ in upload_listing(tmp_path).refused] == ["conf/logger/mine.yaml"]
