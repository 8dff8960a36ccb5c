"""The run's records: ``metrics.jsonl`` (one line per step), ``events.jsonl``, and the observers
(progress, plots, wandb, Ray metrics) that are told of both."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path


class RunLog:
    """metrics.jsonl (one line per step) and events.jsonl in the run directory, and the observers.

    ``on_metrics`` and ``on_event``: callbacks(record) told of every step record and of every
    announced event (started, failure, recovered, finished, failed, ...). An observer never stops
    the job: its exceptions are counted in ``observer_errors`` and written as ``observer_error`` events.
    """

    def __init__(self, run_dir: Path, log=print):
        self.metrics_path, self.events_path = run_dir / "metrics.jsonl", run_dir / "events.jsonl"
        self.log = log
        self.on_metrics: list = []
        self.on_event: list = []
        self.observer_errors: dict[str, int] = {}  # "on_metrics:Name" -> exceptions that callback raised

    def _records(self) -> list[str]:
        """The log's lines, less a last line torn by a driver killed mid-write."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        if lines:
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()
        return lines

    def truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self._records() if json.loads(line)["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)

    def last_step(self) -> int:
        lines = self._records()
        return json.loads(lines[-1])["step"] if lines else 0

    def write_metrics(self, records: list[dict]) -> None:
        with self.metrics_path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def event(self, name: str, **fields) -> dict:
        """Write an event to events.jsonl only (the observers are not told: ``announce``)."""
        record = {"time": time.time(), "event": name, **_plain(fields)}
        with self.events_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def announce(self, name: str, **fields) -> None:
        """Write an event and tell the observers."""
        self._notify("on_event", self.on_event, self.event(name, **fields))

    def tell_metrics(self, record: dict) -> None:
        """Tell the observers of one step's record (already written by ``write_metrics``)."""
        self._notify("on_metrics", self.on_metrics, record)

    def _notify(self, kind: str, callbacks: list, record: dict) -> None:
        """Observers (progress, plots, wandb, Ray metrics) never stop the job: an exception in one
        is recorded as an ``observer_error`` event and the run goes on."""
        for callback in callbacks:
            try:
                callback(record)
            except Exception as exc:
                name = f"{kind}:{getattr(callback, '__qualname__', type(callback).__name__)}"
                n = self.observer_errors[name] = self.observer_errors.get(name, 0) + 1
                if n == 1 or n % 100 == 0:  # the first, then every 100th: an outage must not flood the log
                    message = f"{type(exc).__name__}: {exc}"[:1000]
                    self.event("observer_error", observer=name, count=n, message=message)
                    self.log(f"observer {name} failed ({n} time(s)); the job goes on: {message.splitlines()[0][:300]}")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour codes (Ray colours its error reports)


def _plain(value):
    """``value`` with terminal colour codes taken out of every string in it."""
    if isinstance(value, str):
        return _ANSI.sub("", value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
