"""A worker that cannot allocate memory fails the job at once, reported as out of memory."""

import pytest
import ray
import torch

from moe_cluster.cluster import Controller, JobFailed
from moe_cluster.cluster.failures import Decision, Failure, FailureKind, classify, on_failure
from tests.cluster.helpers import events, small_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote
def allocate(nbytes: int):
    return torch.empty(nbytes, dtype=torch.uint8).sum()  # the CPU allocator refuses: more than any machine has


@ray.remote
def raise_memory_error():
    raise MemoryError("out of memory")


@ray.remote
def raise_value_error():
    raise ValueError("model.dim must be >= 1")


def _failure(ref) -> Failure:
    with pytest.raises(Exception) as err:
        ray.get(ref)
    return classify(err.value, step=7)


def test_allocation_failures_are_final_and_say_so(ray_local):
    for ref in (allocate.remote(2**52), raise_memory_error.remote()):
        failure = _failure(ref)
        assert failure.kind is FailureKind.OUT_OF_MEMORY and failure.step == 7
        assert "moe-cluster plan" in failure.message.splitlines()[0]
        assert on_failure(failure, failures_so_far=0, max_failures=3) is Decision.GIVE_UP
    assert "DefaultCPUAllocator" in _failure(allocate.remote(2**52)).message
    assert _failure(raise_value_error.remote()).kind is FailureKind.INVALID  # unchanged


def test_a_job_whose_workers_cannot_allocate_stops_without_retrying(ray_local, tmp_path):
    # Bypasses validate (which would refuse it): a 2**33-token vocabulary's embedding alone is
    # 2 TB, so every worker's model allocation fails as it builds its trainer.
    job = small_job(tmp_path)
    job.model.vocab_size = 2**33
    with pytest.raises(JobFailed, match=r"\(out_of_memory, not retried.*: a worker ran out of memory.*moe-cluster plan") as err:
        Controller(job, tmp_path).run()
    assert "resume=true" not in str(err.value)
    log = events(tmp_path)
    failures = [e for e in log if e["event"] == "failure"]
    assert len(failures) == 1 and failures[0]["kind"] == "out_of_memory"
    assert "DefaultCPUAllocator" in failures[0]["message"]
    assert log[-1]["event"] == "failed" and not any(e["event"] == "recovered" for e in log)


@ray.remote
def raise_os_error(errno_: int, from_save: bool):
    from moe_cluster.train.checkpoint import CheckpointWriteError

    raise (CheckpointWriteError if from_save else OSError)(errno_, "No space left on device" if errno_ == 28 else "denied")


def test_a_full_or_refusing_disk_is_final_and_named_and_other_errors_are_not(ray_local, tmp_path):
    """What tests/cluster/test_faults.py::test_a_full_disk_is_final_and_named shows on a real full
    disk (it needs root to mount one), told from Ray's own wrapping of the worker's error."""
    import errno

    from moe_cluster.cluster.runlog import RunLog

    for errno_, from_save, kind in [
        (errno.ENOSPC, True, FailureKind.STORAGE), (errno.EACCES, True, FailureKind.STORAGE),
        (errno.ENOSPC, False, FailureKind.STORAGE), (errno.EACCES, False, FailureKind.EXCEPTION),
    ]:  # fmt: skip
        failure = _failure(raise_os_error.remote(errno_, from_save))
        assert failure.kind is kind, (errno_, from_save, failure)
        first = failure.message.splitlines()[0]
        assert f"[Errno {errno_}]" in first and "ray::" not in first, first  # the worker's error, not Ray's repr
        if kind is FailureKind.STORAGE:
            assert on_failure(failure, failures_so_far=0, max_failures=3) is Decision.GIVE_UP
    log = RunLog(tmp_path)
    log.event("failure", message=failure.message, nested={"a": ["\x1b[31mred\x1b[39m"]})  # as Ray colours reports
    assert "\x1b[" not in (tmp_path / "events.jsonl").read_text()
