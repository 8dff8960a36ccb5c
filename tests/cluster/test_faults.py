"""Real failures on a local Ray instance: SIGKILLed workers, a hung worker, a failure budget."""

import os
import random
import signal
import time

import pytest
import ray

from moe_cluster.cluster import Controller, JobFailed
from moe_cluster.train import Trainer, checkpoint
from tests.cluster.helpers import Background, events, losses, small_job, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
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


def test_sigkill_worker_recovers_with_nothing_lost(reference, tmp_path):
    kill_at = random.Random(os.getpid()).randint(3, 24)
    controller = Controller(small_job(tmp_path), tmp_path, chunk_steps=2)
    job = Background(controller.run)
    _kill_worker_at(controller, kill_at)
    summary = job.result(timeout=180)
    assert summary["failures"] == 1
    (rec,) = summary["recoveries"]
    assert 0 <= rec["replayed_steps"] <= 5  # trainer.checkpoint_every
    assert losses(tmp_path) == reference  # step for step, bitwise
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds[0] == "started" and "failure" in kinds and "recovered" in kinds and kinds[-1] == "finished"
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
    assert failure["kind"] == "hang"
    assert failure["time"] - stopped_at < 2 * timeout + 5  # detected within the (chunk's) timeout
    assert summary["failures"] == 1
    assert losses(tmp_path) == reference


def test_more_failures_than_allowed_stops_with_checkpoints_intact(ray_local, tmp_path):
    controller = Controller(small_job(tmp_path, max_failures=1), tmp_path, chunk_steps=2)
    job = Background(controller.run)
    _kill_worker_at(controller, 6)
    wait_for(lambda: controller.recoveries, 120, "the first recovery")
    _kill_worker_at(controller, controller.step + 1)
    with pytest.raises(JobFailed, match=r"after 1 recovered failure\(s\) \(trainer.max_failures=1\).*Checkpoints are intact"):
        job.result(timeout=180)
    assert [e["event"] for e in events(tmp_path)][-1] == "failed"
    latest = checkpoint.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None
    # The checkpoint loads, here on one process (EP=1) although it was written at EP=2.
    job_cfg = small_job(tmp_path)
    trainer = Trainer(job_cfg.model, job_cfg.trainer, job_cfg.data, ep=1)
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
