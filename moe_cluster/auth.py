"""Ray's auth token: where its clients find it, and where it may be sent.

Standard library only: ``moe-cluster submit`` (cli, submit.py) and the job's own connection to a
cluster (cluster/launch.py) apply the same rule.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not resolved here (no DNS), so not trusted as loopback
        return False


def auth_token(environ: Mapping[str, str] = os.environ) -> str:
    """Ray's auth token as its clients find it: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
    else ~/.ray/auth_token (where `ray start` writes it); "" when there is none."""
    token = environ.get("RAY_AUTH_TOKEN", "")
    if not token:
        path = Path(environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        token = path.read_text().strip() if path.is_file() else ""
    return token


def plain_http_token_error(
    address: str, has_token: bool, insecure: bool, local: frozenset[str] | set[str] = frozenset()
) -> str | None:
    """Why the auth token must not go to `address`, or None when it may (or there is none).

    A token travels in clear over http, so only to loopback, unless https or `insecure`. Ray reaches
    schemeless `host:port` and `ray://` addresses over http too; `auto` is the local cluster.
    ``local``: further addresses that are this machine's own (a driver on a cluster's head reaches
    its GCS at the head's address).
    """
    if not has_token or insecure or address == "auto":
        return None
    try:
        parts = urlsplit(address if "://" in address else f"http://{address}")
        scheme, host = parts.scheme, parts.hostname or ""
    except ValueError:
        return f"cannot parse the address {address!r}"
    if scheme == "https" or _is_loopback(host) or host in local:
        return None
    return (
        f"refusing to send the cluster's auth token unencrypted ({scheme}://) to {host or address}: use an "
        f"https:// address (or an SSH tunnel / `kubectl port-forward` to 127.0.0.1), or pass --insecure "
        f"if this network is trusted"
    )
