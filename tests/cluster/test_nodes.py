"""Losing a node, on a simulated multi-node cluster (ray.cluster_utils.Cluster)."""

import time

import pytest

from moe_cluster.cluster import Controller, JobFailed
from tests.cluster import helpers
from tests.cluster.helpers import Background, events, local_cluster, losses, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def small_job(run_dir, **kw):
    """The restart-from-checkpoint path (trainer.recovery=checkpoint); tests/cluster/test_peers.py
    covers recovery from peers' memory."""
    return helpers.small_job(run_dir, recovery="checkpoint", **kw)


@pytest.fixture
def cluster():
    # Two one-CPU nodes: one worker per node.
    with local_cluster(2) as c:
        yield c


def _spread_job(path, **kw):
    job = small_job(path, **kw)
    job.cluster.placement_strategy = "SPREAD"
    return job


def _remove_a_node_at(controller, cluster, nodes, step):
    wait_for(lambda: controller.step >= step, 120, f"step {step}")
    cluster.remove_node(nodes[1])


def test_node_lost_then_capacity_returns(cluster, tmp_path):
    c, nodes = cluster
    reference_dir = tmp_path / "reference"
    assert Controller(_spread_job(reference_dir), reference_dir, chunk_steps=2).run()["failures"] == 0

    run = tmp_path / "run"
    controller = Controller(_spread_job(run), run, chunk_steps=2)
    job = Background(controller.run)
    _remove_a_node_at(controller, c, nodes, 8)
    # The job waits for capacity (it says so in its log); a replacement node arrives.
    time.sleep(3)
    c.add_node(num_cpus=1)
    summary = job.result(timeout=240)
    assert summary["failures"] == 1
    assert losses(run) == losses(reference_dir)


def test_node_lost_for_good_fails_clearly_after_the_capacity_timeout(cluster, tmp_path):
    c, nodes = cluster
    controller = Controller(_spread_job(tmp_path, capacity_timeout_s=5.0), tmp_path, chunk_steps=2)
    job = Background(controller.run)
    _remove_a_node_at(controller, c, nodes, 6)
    started = time.monotonic()
    with pytest.raises(JobFailed, match=r"could not place 2 x \{'CPU': 1.0\} within trainer.capacity_timeout_s=5"):
        job.result(timeout=120)
    assert time.monotonic() - started < 60
    assert [e["event"] for e in events(tmp_path)][-1] == "failed"
