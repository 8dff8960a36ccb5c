"""Real failures on a local Ray instance: SIGKILLed workers, a hung worker, a failure budget."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import ray

from moe_cluster.cluster import Controller, JobFailed
from moe_cluster.train import Trainer, checkpoint
from tests.cluster import helpers
from tests.cluster.helpers import Background, events, losses, seeded_random, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def small_job(run_dir, **kw):
    """The restart-from-checkpoint path (trainer.recovery=checkpoint); tests/cluster/test_peers.py
    covers recovery from peers' memory."""
    return helpers.small_job(run_dir, recovery="checkpoint", **kw)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    summary = Controller(small_job(run), run, chunk_steps=2).run()
    assert summary["failures"] == 0 and summary["steps"] == 30
    return losses(run)


def _kill_worker_at(controller, step: int, sig=signal.SIGKILL, rank: int = 1) -> int:
    wait_for(lambda: controller.step >= step and controller.group and controller.group.workers, 120, f"step {step}")
    pid = controller.group.pids()[rank]
    os.kill(pid, sig)
    return pid


def _check_the_job_listens_on_the_node_address_only(pids: list[int]) -> None:
    """Each worker listens on one wildcard address (Ray's own core-worker server) and, for the job's
    process groups and rank 0's rendezvous store, on the node's address only (cluster/network.py)."""
    import psutil

    node_ip = ray.util.get_node_ip_address()
    for rank, pid in enumerate(pids):
        listening = [c.laddr for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"]
        wildcard = [a for a in listening if a.ip in ("0.0.0.0", "::")]
        ours = [a for a in listening if a.ip not in ("0.0.0.0", "::")]
        assert len(wildcard) == 1, f"rank {rank} listens on every interface: {listening}"
        assert ours and all(a.ip == node_ip for a in ours), f"rank {rank}: {listening}, node {node_ip}"


def test_sigkill_worker_recovers_with_nothing_lost(reference, tmp_path):
    kill_at = seeded_random("sigkill").randint(3, 24)
    controller = Controller(small_job(tmp_path), tmp_path, chunk_steps=2)
    job = Background(controller.run)
    wait_for(lambda: controller.step >= 1 and controller.group and controller.group.workers, 120, "step 1")
    _check_the_job_listens_on_the_node_address_only(controller.group.pids())
    _kill_worker_at(controller, kill_at)
    summary = job.result(timeout=180)
    assert summary["failures"] == 1
    (rec,) = summary["recoveries"]
    assert 0 <= rec["replayed_steps"] <= 5  # trainer.checkpoint_every
    assert losses(tmp_path) == reference  # step for step, bitwise
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds[0] == "started" and "failure" in kinds and "recovered" in kinds and kinds[-1] == "finished"
    failure = next(e for e in events(tmp_path) if e["event"] == "failure")
    assert (failure["kind"], failure["ranks"]) == ("actor_died", [1])  # the dead one is named
    print(f"SIGKILL after step {kill_at}: recovery {rec['recovery_s']:.2f} s, replayed {rec['replayed_steps']} steps")


def test_hung_worker_is_detected_and_recovered(reference, tmp_path):
    timeout = 4.0
    controller = Controller(small_job(tmp_path, step_timeout_s=timeout), tmp_path, chunk_steps=2)
    job = Background(controller.run)
    pid = _kill_worker_at(controller, 8, sig=signal.SIGSTOP)  # frozen: its peers wait in a collective
    stopped_at = time.time()
    try:
        summary = job.result(timeout=180)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    failure = next(e for e in events(tmp_path) if e["event"] == "failure")
    assert failure["kind"] == "hang" and failure["ranks"] == [1]  # the stopped one, not its waiting peer
    assert failure["time"] - stopped_at < 2 * timeout + 5  # detected within the (chunk's) timeout
    assert summary["failures"] == 1
    assert losses(tmp_path) == reference


def test_more_failures_than_allowed_stops_with_checkpoints_intact(ray_local, tmp_path):
    controller = Controller(small_job(tmp_path, max_failures=1), tmp_path, chunk_steps=2)
    job = Background(controller.run)
    _kill_worker_at(controller, 6)
    wait_for(lambda: controller.recoveries, 120, "the first recovery")
    _kill_worker_at(controller, controller.step + 1)
    with pytest.raises(JobFailed, match=r"after 1 recovered failure\(s\) \(trainer.max_failures=1\).*Latest complete checkpoint: .*step_"):
        job.result(timeout=180)
    assert [e["event"] for e in events(tmp_path)][-1] == "failed"
    latest = checkpoint.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None
    # The checkpoint loads, here on one process (EP=1) although it was written at EP=2.
    job_cfg = small_job(tmp_path)
    trainer = Trainer(job_cfg.model, job_cfg.trainer, job_cfg.data)  # one process, ep 1 (local_layout)
    assert trainer.resume(latest) and trainer.step >= 5


def test_existing_checkpoints_need_resume(ray_local, tmp_path, reference):
    first = Controller(small_job(tmp_path, max_steps=10), tmp_path, chunk_steps=2).run()
    assert first["steps"] == 10
    with pytest.raises(ValueError, match="pass resume=true"):
        Controller(small_job(tmp_path), tmp_path).run()
    job = small_job(tmp_path)
    job.resume = True
    assert Controller(job, tmp_path, chunk_steps=2).run()["steps"] == 30
    assert losses(tmp_path) == reference  # the relaunched run continues exactly


def _deepspeed_job(run_dir):
    job = small_job(run_dir, engine="deepspeed")
    job.deepspeed = {"zero_optimization": {"stage": 2}}
    return job


def test_deepspeed_engine_recovers_from_sigkill(reference, tmp_path):
    # ZeRO-2 partitions live in the workers; after the SIGKILL the new workers rebuild them from
    # the checkpoint (assembled per parameter), and the run goes on exactly as an uninterrupted one.
    uninterrupted = Controller(_deepspeed_job(tmp_path / "a"), tmp_path / "a", chunk_steps=2).run()
    assert uninterrupted["failures"] == 0
    controller = Controller(_deepspeed_job(tmp_path / "b"), tmp_path / "b", chunk_steps=2)
    job = Background(controller.run)
    _kill_worker_at(controller, 13, rank=0)
    summary = job.result(timeout=240)
    assert summary["failures"] == 1 and summary["steps"] == 30
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    # And the DeepSpeed run is the native run, up to reassociation grown over 30 steps.
    assert list(losses(tmp_path / "a").values()) == pytest.approx(list(reference.values()), rel=2e-3)


def test_checkpoint_of_another_architecture_is_refused_before_any_step(ray_local, tmp_path):
    assert Controller(small_job(tmp_path, max_steps=5), tmp_path, chunk_steps=5).run()["steps"] == 5
    job = small_job(tmp_path)
    job.resume, job.model.dim, job.model.moe.num_experts = True, 32, 8
    before = events(tmp_path)
    with pytest.raises(ValueError, match=r"model.dim: checkpoint 64, job 32; model.moe.num_experts: checkpoint 4, job 8"):
        Controller(job, tmp_path).run()
    assert events(tmp_path) == before  # nothing started


def _garble(shard) -> None:
    """Overwrite bytes in the middle of a shard, keeping its size (DCP would load the garbage)."""
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 256] = bytes(255 - b for b in raw[middle : middle + 256])
    shard.write_bytes(bytes(raw))


def test_unreadable_checkpoints_are_set_aside_and_the_run_resumes_from_an_earlier_one(reference, tmp_path):
    first = small_job(tmp_path, max_steps=15)
    assert Controller(first, tmp_path, chunk_steps=5).run()["steps"] == 15
    ckpts = tmp_path / "checkpoints"
    _garble(sorted((ckpts / "step_00000015").glob("*.distcp"))[-1])  # found by the workers' checksums
    next(iter(sorted((ckpts / "step_00000010").glob("*.distcp")))).unlink()  # found by the driver
    job = small_job(tmp_path, max_failures=0)  # setting aside spends no failure budget
    job.resume = True
    said = []
    summary = Controller(job, tmp_path, chunk_steps=5, log=said.append).run()
    assert summary["steps"] == 30 and summary["failures"] == 0
    assert "recovered: resumed from step 5, replaying 10 step(s)" in said  # logged 15, resumed at 5
    moved = [e for e in events(tmp_path) if e["event"] == "checkpoint_set_aside"]
    assert [e["checkpoint"].rsplit("/", 1)[1] for e in moved] == ["step_00000015", "step_00000010"]
    assert "checksum" in moved[0]["reason"] and "missing" in moved[1]["reason"]
    assert (ckpts / "step_00000015.corrupt").is_dir() and (ckpts / "step_00000010.corrupt").is_dir()  # kept
    assert losses(tmp_path) == reference  # replayed from step 5: the same run


def test_no_readable_checkpoint_left_starts_from_scratch_and_says_so(reference, tmp_path):
    assert Controller(small_job(tmp_path, max_steps=5), tmp_path, chunk_steps=5).run()["steps"] == 5
    for f in (tmp_path / "checkpoints").glob("step_*/.metadata"):
        f.unlink()
    job = small_job(tmp_path, max_steps=10)
    job.resume = True
    assert Controller(job, tmp_path, chunk_steps=5).run()["steps"] == 10
    (moved,) = [e for e in events(tmp_path) if e["event"] == "checkpoint_set_aside"]
    assert "metadata" in moved["reason"]
    assert list(losses(tmp_path).values()) == list(reference.values())[:10]  # from step 0 again


class _Broken:
    """An observer whose every call raises: a wandb outage, a plot that cannot be drawn."""

    def __init__(self):
        self.calls = 0

    def __call__(self, record):
        self.calls += 1
        raise ConnectionError("observer backend unreachable")


def test_observer_errors_do_not_stop_the_job(ray_local, tmp_path):
    controller = Controller(small_job(tmp_path, max_steps=10), tmp_path, chunk_steps=5)
    on_metrics, on_event = _Broken(), _Broken()
    controller.on_metrics.append(on_metrics)
    controller.on_event.append(on_event)
    summary = controller.run()
    assert summary["steps"] == 10 and summary["failures"] == 0
    assert on_metrics.calls == 10 and on_event.calls == 2  # started, finished
    errors = [e for e in events(tmp_path) if e["event"] == "observer_error"]
    assert len(errors) == 2 and {e["count"] for e in errors} == {1}  # the first error of each, not every one
    assert "ConnectionError: observer backend unreachable" in errors[0]["message"]
    assert events(tmp_path)[-1]["event"] == "finished"


def test_a_failed_job_with_a_broken_observer_ends_failed_with_its_workers_released(ray_local, tmp_path):
    controller = Controller(small_job(tmp_path, max_failures=0), tmp_path, chunk_steps=2)
    controller.on_event.append(_Broken())
    job = Background(controller.run)
    killed = _kill_worker_at(controller, 4)
    survivors = [pid for pid in controller.group.pids() if pid != killed]
    with pytest.raises(JobFailed, match="trainer.max_failures=0"):
        job.result(timeout=180)
    assert events(tmp_path)[-1]["event"] == "failed"
    wait_for(lambda: not any(_alive(pid) for pid in survivors), 30, "the surviving worker to be released")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_diverged_run_fails_as_diverged_and_keeps_its_last_finite_checkpoint(ray_local, tmp_path):
    """lr 100 after a 10-step warmup overflows this model's gradient norm at about step 16
    (tests/train/test_nan_policy.py): the job stops there, once, and never commits a NaN state."""
    job = small_job(tmp_path, keep_checkpoints=1, optim=helpers.OptimConfig(lr=100.0, warmup_steps=10, decay_steps=30))
    with pytest.raises(JobFailed, match=r"\(diverged, not retried.*the run diverged at step \d+: loss"):
        Controller(job, tmp_path, chunk_steps=5).run()
    (failure,) = [e for e in events(tmp_path) if e["event"] == "failure"]
    assert failure["kind"] == "diverged"
    done = checkpoint.complete_checkpoints(tmp_path / "checkpoints")
    assert done and done[-1][0] <= failure["step"] < 30  # the checkpoints stop at the last good chunk
    from moe_cluster.interop.hf_mixtral import read_checkpoint

    _, state = read_checkpoint(done[-1][1])
    assert all(t.isfinite().all() for t in state.values())


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB file system: the first checkpoint (about a megabyte) cannot fit."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_final_and_named(ray_local, tmp_path, tiny_disk):
    job = small_job(tmp_path, checkpoint_dir=str(tiny_disk / "checkpoints"))
    with pytest.raises(JobFailed, match=r"\(storage, not retried.*No space left on device"):
        Controller(job, tmp_path, chunk_steps=5).run()
    failures = [e for e in events(tmp_path) if e["event"] == "failure"]
    assert [e["kind"] for e in failures] == ["storage"]  # never retried with replays
    assert "No space left on device" in failures[0]["message"].splitlines()[0]
    assert all("\x1b[" not in line for line in (tmp_path / "events.jsonl").read_text().splitlines())
    assert json.loads(Path(tmp_path / "events.jsonl").read_text().splitlines()[-1])["event"] == "failed"


def test_a_resume_with_other_data_is_refused_unless_asked_and_then_recorded(ray_local, tmp_path):
    assert Controller(small_job(tmp_path, max_steps=5), tmp_path, chunk_steps=5).run()["steps"] == 5
    job = small_job(tmp_path, max_steps=10)
    job.resume, job.data = True, helpers.DataConfig(max_bytes=300_000)
    with pytest.raises(ValueError, match=r"data.max_bytes: checkpoint 400000, job 300000.*resume_with_changes=true"):
        Controller(job, tmp_path, chunk_steps=5).run()
    job.resume_with_changes = True
    assert Controller(job, tmp_path, chunk_steps=5).run()["steps"] == 10
    (changed,) = [e for e in events(tmp_path) if e["event"] == "resumed_with_changes"]
    assert changed["changes"] == ["data.max_bytes: checkpoint 400000, job 300000"]
