"""What the driver refuses before Ray starts: a run directory another job holds, a fresh start over
an earlier run's records, and a resume whose tokenizer, data or sequence shape changed.

No Ray here: ``Controller.check_checkpoints`` is what ``run_job`` calls before connecting. The two
real jobs in one run directory are tests/cluster/test_driver.py::test_two_jobs_*.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from moe_cluster.cluster.controller import Controller
from moe_cluster.cluster.runlock import LOCK_FILE, RunLock, RunLocked
from moe_cluster.config import JobConfig, TrainerConfig
from moe_cluster.data import prepare
from moe_cluster.model import ModelConfig, MoEConfig
from moe_cluster.train import DataConfig, Trainer
from tests.data.helpers import documents, train_bpe, write_jsonl

MODEL = ModelConfig(dim=32, n_layers=1, n_heads=4, max_seq_len=32, moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=16))


def _job(run_dir, **kw) -> JobConfig:
    trainer = TrainerConfig(**{"global_batch_size": 2, "seq_len": 16, **kw.pop("trainer", {})})
    model = dataclasses.replace(MODEL, **kw.pop("model", {}))
    return JobConfig(model=model, trainer=trainer, run_dir=str(run_dir), **kw)


def _checkpointed(run_dir, data: DataConfig, model: ModelConfig = MODEL, seq_len: int = 16):
    job = _job(run_dir)
    trainer = Trainer(model, dataclasses.replace(job.trainer, seq_len=seq_len), data, checkpoint_dir=str(run_dir / "checkpoints"))
    trainer.train_step()
    return trainer.save_checkpoint()


def test_a_held_directory_is_refused_naming_its_holder(tmp_path):
    first = Controller(_job(tmp_path), tmp_path)
    first.check_checkpoints()
    with pytest.raises(RunLocked, match=rf"run directory {tmp_path} is in use by another job \(pid {os.getpid()} on"):
        Controller(_job(tmp_path), tmp_path).check_checkpoints()
    first.release_locks()
    Controller(_job(tmp_path), tmp_path).check_checkpoints()  # free again


def test_a_shared_checkpoint_directory_is_locked_too(tmp_path):
    shared = tmp_path / "shared"
    a = _job(tmp_path / "a", trainer={"checkpoint_dir": str(shared)})
    b = _job(tmp_path / "b", trainer={"checkpoint_dir": str(shared)})
    Controller(a, tmp_path / "a").check_checkpoints()
    with pytest.raises(RunLocked, match=rf"checkpoint directory {shared} is in use"):
        Controller(b, tmp_path / "b").check_checkpoints()


def test_another_run_cannot_name_this_runs_checkpoints_as_its_own(tmp_path):
    """Job A keeps its checkpoints in the default place (run_dir/checkpoints); job B, in another run
    directory, points trainer.checkpoint_dir there: refused, both directories are always locked."""
    Controller(_job(tmp_path / "a"), tmp_path / "a").check_checkpoints()
    b = _job(tmp_path / "b", resume=True, trainer={"checkpoint_dir": str(tmp_path / "a" / "checkpoints")})
    with pytest.raises(RunLocked, match=r"checkpoint directory .*/a/checkpoints is in use"):
        Controller(b, tmp_path / "b").check_checkpoints()


def test_a_killed_holder_releases_the_lock(tmp_path):
    """The kernel drops a flock with its process: SIGKILL leaves no stale lock behind."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from moe_cluster.cluster.runlock import RunLock
            RunLock({str(tmp_path)!r}, "run directory").acquire()
            print("held", flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path, "run directory").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path, "run directory")
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_fresh_start_over_an_earlier_runs_records_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    with pytest.raises(ValueError, match=r"holds metrics.jsonl of an earlier run; pass resume=true"):
        Controller(_job(tmp_path), tmp_path).check_checkpoints()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # nothing truncated
    Controller(_job(tmp_path, resume=True), tmp_path).check_checkpoints()  # resume=true may continue it


def test_resume_with_another_seq_len_or_data_needs_resume_with_changes(tmp_path):
    stdlib = DataConfig(source="stdlib", max_bytes=200_000)
    _checkpointed(tmp_path, stdlib)
    job = _job(tmp_path, resume=True, trainer={"seq_len": 8})
    job.data = stdlib
    with pytest.raises(ValueError, match=r"trainer.seq_len: checkpoint 16, job 8.*resume_with_changes=true"):
        Controller(job, tmp_path).check_checkpoints()
    job.data = DataConfig(source="stdlib", max_bytes=100_000)
    job.trainer = dataclasses.replace(job.trainer, seq_len=16)
    with pytest.raises(ValueError, match=r"data.max_bytes: checkpoint 200000, job 100000"):
        Controller(job, tmp_path).check_checkpoints()
    job.resume_with_changes = True
    controller = Controller(job, tmp_path)
    controller.check_checkpoints()
    assert controller.checkpoints.changes == ["data.max_bytes: checkpoint 200000, job 100000"]  # the run's first event says so


def test_resume_with_another_tokenizer_is_refused_even_with_changes_allowed(tmp_path):
    folders = []
    for i in range(2):  # two BPEs of one vocabulary size, trained on other text: the same ids, other meanings
        docs = documents(80, seed=i)
        bpe = train_bpe(tmp_path / f"bpe{i}", docs, vocab_size=300)
        prepare(write_jsonl(tmp_path / f"d{i}.jsonl", docs), tmp_path / f"data{i}", tokenizer=str(bpe), val_fraction=0.1)
        folders.append(tmp_path / f"data{i}")
    run = tmp_path / "run"
    model = dataclasses.replace(MODEL, vocab_size=300)
    _checkpointed(run, DataConfig(source="bin", path=str(folders[0])), model=model)
    job = _job(run, resume=True, resume_with_changes=True, model={"vocab_size": 300})
    job.data = DataConfig(source="bin", path=str(folders[1]))
    with pytest.raises(ValueError, match=r"trained with another tokenizer \(tokenizer sha256: checkpoint '.+', job '.+'\)"):
        Controller(job, run).check_checkpoints()
