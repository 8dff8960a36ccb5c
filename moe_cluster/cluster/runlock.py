"""One job per run directory: an exclusive lock held for the job's life.

Two jobs started with the same run directory (or sharing a ``trainer.checkpoint_dir``) would
interleave their ``metrics.jsonl`` lines and overwrite each other's checkpoints. The driver takes
an exclusive ``flock`` on a file in each directory and keeps it until the job ends. The kernel
releases it when the holder dies, however it dies (SIGKILL, a lost node), so a stale lock never
blocks a relaunch; the file only records who held it, for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".moe-cluster.lock"


class RunLocked(ValueError):
    """Another live job holds the directory."""


class RunLock:
    """``acquire()`` takes the lock of ``directory`` or raises RunLocked naming its holder."""

    def __init__(self, directory: str | Path, what: str):
        self.path, self.what = Path(directory) / LOCK_FILE, what
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(
                f"{self.what} {self.path.parent} is in use by another job ({holder}); two jobs in one directory would "
                "mix their metrics and overwrite each other's checkpoints: wait for it to end (or stop it), or choose "
                "another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder is unknown"
