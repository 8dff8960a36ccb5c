"""What ``moe-cluster submit`` sends: which files, which environment variables, over which scheme.

Pure functions, tested without a cluster (tests/test_submit.py); ``cli.cmd_submit`` applies them
in order before anything leaves this machine.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

# The one list of environment variables passed on to the job when set here, besides those named with
# `--env NAME`. Their values reach the job through Ray's runtime_env and are never printed.
PASS_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "HF_TOKEN")

# Never uploaded (gitwildmatch, relative to the working dir), on top of Ray's own defaults and the
# working dir's .gitignore / .rayignore files. Secrets match at any depth; data/, outputs/, wandb/
# and multirun/ only at the top: conf/data/ is a config group and moe_cluster/data/ a package.
NEVER_UPLOAD = (
    ".env", ".env.*", "*.pem", "*.key",
    ".git", ".venv", "__pycache__", "*.egg-info",
    "/data", "/outputs", "/wandb", "/multirun",
)  # fmt: skip

# What a working dir must hold: the job runs `python jobs/train.py`, which composes conf/.
CHECKOUT_FILES = ("jobs/train.py", "conf/config.yaml")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_to_pass(extra: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """PASS_ENV plus the `--env` names, those set in `environ`; a ValueError for a bad `--env`.

    The messages name variables, never values: `--env NAME=VALUE` is refused without echoing VALUE.
    """
    for name in extra:
        if "=" in name:
            bare = name.split("=", 1)[0]
            raise ValueError(
                f"--env {bare}=...: give only the name; a value on the command line lands in the shell "
                f"history and in `ps`. Export {bare} in the environment instead, then pass --env {bare}"
            )
        if not _NAME.fullmatch(name):
            raise ValueError(f"--env {name!r} is not an environment variable name")
        if name not in environ:
            raise ValueError(f"--env {name}: {name} is not set in this environment; export it first")
    return {name: environ[name] for name in dict.fromkeys((*PASS_ENV, *extra)) if name in environ}


def working_dir(given: str | None, package_root: Path) -> Path:
    """The folder to upload: `given`, else the checkout this package runs from; it must be a checkout.

    An installed (non-editable) package has no jobs/ or conf/ beside it, so it needs `--working-dir`.
    """
    if given is None:
        if all((package_root / f).is_file() for f in CHECKOUT_FILES):
            return package_root
        raise ValueError(
            f"moe-cluster is installed as a package ({package_root}), without jobs/ and conf/: pass "
            f"--working-dir pointing at a project checkout (a folder with {' and '.join(CHECKOUT_FILES)})"
        )
    path = Path(given).resolve()
    missing = [f for f in CHECKOUT_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"--working-dir {given} is not a project checkout: it has no {' and no '.join(missing)}; "
            f"point it at a folder with {' and '.join(CHECKOUT_FILES)}"
        )
    return path


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not resolved here (no DNS), so not trusted as loopback
        return False


def plain_http_token_error(address: str, has_token: bool, insecure: bool) -> str | None:
    """Why the auth token must not go to `address`, or None when it may (or there is none).

    A token travels in clear over http, so only to loopback, unless https or `insecure`. Ray reaches
    schemeless `host:port` and `ray://` addresses over http too; `auto` is the local cluster.
    """
    if not has_token or insecure or address == "auto":
        return None
    try:
        parts = urlsplit(address if "://" in address else f"http://{address}")
        scheme, host = parts.scheme, parts.hostname or ""
    except ValueError:
        return f"cannot parse the address {address!r}"
    if scheme == "https" or _is_loopback(host):
        return None
    return (
        f"refusing to send the cluster's auth token unencrypted ({scheme}://) to {host or address}: use an "
        f"https:// address (or an SSH tunnel / `kubectl port-forward` to 127.0.0.1), or pass --insecure "
        f"if this network is trusted"
    )


def upload_listing(root: Path, excludes: Sequence[str]) -> list[Path]:
    """The files Ray packs for working_dir `root` with runtime_env["excludes"] `excludes`.

    This reuses Ray's own traversal, which is private API (ray._private.runtime_env.packaging, as
    of Ray 2.60): `_zip_files` calls `_dir_travel` with `[_get_excludes(root, excludes)]`, and
    `_dir_travel` adds each folder's .gitignore / .rayignore (`get_excludes_from_ignore_files`); the
    excludes are Ray's defaults plus the runtime_env's (`working_dir.upload_working_dir_if_needed`).
    If these move, follow `_zip_files` in the new Ray and update this function; the caller prints
    "size unknown" on ImportError / AttributeError / TypeError rather than refuse to submit.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.absolute()
    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    files: list[Path] = []

    def handler(path: Path) -> None:
        if path.is_file():
            files.append(path)

    # A logger without handlers: Ray's INFO line naming the ignore files stays out of our output.
    quiet = logging.getLogger(__name__)
    _dir_travel(root, [_get_excludes(root, patterns)], handler, include_gitignore=include_gitignore, logger=quiet)
    return files
