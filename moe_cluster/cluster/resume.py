"""Where a job resumes: the checks on an earlier run's records before anything starts, the newest
checkpoint the log allows, and the unreadable ones set aside. Needs no Ray."""

from __future__ import annotations

from pathlib import Path

from ..config import JobConfig
from ..train import checkpoint, run_info
from .runlog import RunLog


class Checkpoints:
    """The job's checkpoint directory, as the controller resumes from it."""

    def __init__(self, job: JobConfig, run_dir: Path, checkpoint_dir: str, runlog: RunLog, log=print):
        self.job, self.run_dir, self.dir, self.runlog, self.log = job, run_dir, checkpoint_dir, runlog, log
        self.set_aside: list[str] = []  # unreadable checkpoints moved out of the way
        self.changes: list[str] = []  # what resume_with_changes let through (``check``)

    def check(self) -> None:
        """Raise ValueError when the run or checkpoint directory holds an earlier run's records and
        the job does not say resume=true, or when the checkpoint to resume is of another
        architecture, tokenizer, data or sequence shape (the last two allowed with
        resume_with_changes=true, and kept in ``changes``)."""
        latest = checkpoint.latest_checkpoint(self.dir)
        logs = (self.runlog.metrics_path, self.runlog.events_path)
        records = [p.name for p in logs if p.is_file() and p.stat().st_size]
        if (latest or records) and not self.job.resume:
            held = f"{self.dir} already holds checkpoints"
            what = held if latest else f"{self.run_dir} holds {', '.join(records)}"
            raise ValueError(
                f"{what} of an earlier run; pass resume=true to continue it, or choose a new run directory"
            )
        if latest:
            checkpoint.check_model_config(latest, self.job.model)
            tokenizer, changes = run_info.resume_changes(checkpoint.read_info(latest), self.job.trainer, self.job.data)
            if tokenizer:
                raise ValueError(
                    f"checkpoint {latest} was trained with another tokenizer ({tokenizer}): its token ids mean other "
                    "text. Resume with data prepared with the checkpoint's tokenizer, or start a new run"
                )
            if changes and not self.job.resume_with_changes:
                raise ValueError(
                    f"resuming checkpoint {latest} with other data or sequence shape ({'; '.join(changes)}); set those "
                    "keys back to the checkpoint's values, or pass resume_with_changes=true to continue with them (an "
                    "event records the change)"
                )
            self.changes = changes

    def resume_point(self) -> str | None:
        """The newest complete checkpoint not past the last step in metrics.jsonl.

        Workers may have committed a checkpoint whose steps' metrics never reached the log (the
        driver or a worker died in between); resuming there would leave holes in the log, so the
        replay starts from an earlier checkpoint instead, and re-creates the later one. A run
        directory with no log yet (``resume=true`` with a shared ``trainer.checkpoint_dir``)
        resumes from the newest checkpoint.
        """
        while True:
            complete = checkpoint.complete_checkpoints(self.dir)
            if self.runlog.metrics_path.exists():
                last_logged = self.runlog.last_step()
                complete = [(step, path) for step, path in complete if step <= last_logged]
            # else: a new run directory resuming a shared checkpoint directory: its log starts there.
            if not complete:
                return None
            path = complete[-1][1]
            problem = checkpoint.verify(path)  # shard files present and whole: cheap, before any actor
            if problem is None:
                return str(path)
            self.put_aside(str(path), problem)

    def put_aside(self, path: str, reason: str) -> None:
        moved = checkpoint.set_aside(path)
        self.set_aside.append(str(moved))
        self.runlog.announce("checkpoint_set_aside", checkpoint=path, moved_to=str(moved), reason=reason[:1000])
        self.log(f"checkpoint {path} is unreadable ({reason[:300]}); moved to {moved}, resuming from the one before")

    def note(self) -> str:
        """What is kept, for a failed job's summary."""
        latest = checkpoint.latest_checkpoint(self.dir)
        note = f"Latest complete checkpoint: {latest}." if latest else "No complete checkpoint was written."
        if self.set_aside:
            note += f" Set aside as unreadable: {', '.join(self.set_aside)}."
        return note
