"""Recovery from peers' memory when nodes go (ray.cluster_utils.Cluster: several raylets here)."""

import pytest

from moe_cluster.cluster import Controller
from tests.cluster.helpers import Background, events, local_cluster, losses, reference_losses, wait_for
from tests.cluster.test_peers import _check_same_run, _grows_back, _held_at, four_workers, two_workers

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def four_nodes():
    with local_cluster(4) as cluster:
        yield cluster


def _spread(job):
    job.cluster.placement_strategy = "SPREAD"
    return job


def test_a_node_lost_for_good_then_capacity_returns(four_nodes, tmp_path, tmp_path_factory):
    c, nodes = four_nodes
    reference = reference_losses("four", four_workers, tmp_path_factory)

    run = tmp_path / "run"
    controller = _grows_back(Controller(_spread(four_workers(run)), run, chunk_steps=2), short_steps=8)
    release = _held_at(controller, 6)
    job = Background(controller.run)
    wait_for(lambda: controller.step >= 6, 120, "step 6")
    c.remove_node(nodes[1])  # its worker, its object store and the snapshots in it are gone
    release.set()
    # The job runs on fewer workers (no capacity for a fourth); then a node joins.
    wait_for(lambda: any(e["event"] == "resized" for e in events(run)), 120, "the job to shrink")
    shrunk_at = next(e["step"] for e in events(run) if e["event"] == "resized")
    wait_for(lambda: controller.step >= shrunk_at + 4, 120, "4 steps on fewer workers")  # held at 8 (_grows_back)
    c.add_node(num_cpus=1)
    summary = job.result(timeout=400)
    assert summary["failures"] == 1 and summary["steps"] == 40
    (rec,) = [e for e in events(run) if e["event"] == "recovered"]
    assert rec["source"] == "peers" and len(rec["replaced_ranks"]) == 1  # no disk read; survivors kept
    resized = [e for e in events(run) if e["event"] == "resized"]
    assert [(e["from_world"], e["to_world"], e["reason"]) for e in resized] == [(4, 2, "lost"), (2, 4, "grew")]
    _check_same_run(run, reference, failed_after=rec["resumed_at"], regrown_at=resized[1]["step"])


@pytest.fixture
def two_nodes():
    with local_cluster(2) as cluster:
        yield cluster


def test_every_copy_lost_falls_back_to_the_checkpoint(two_nodes, tmp_path, tmp_path_factory):
    # Two workers on two nodes, each holding its own state and its neighbour's: both nodes go, so
    # no copy is left in memory. The job waits for capacity, then restarts from disk.
    c, nodes = two_nodes
    reference = reference_losses("two", two_workers, tmp_path_factory)
    run = tmp_path / "run"
    controller = Controller(_spread(two_workers(run)), run, chunk_steps=2)
    release = _held_at(controller, 12)
    job = Background(controller.run)
    wait_for(lambda: controller.step >= 12, 120, "step 12")  # past the first checkpoint (step 10)
    for node in nodes:
        c.remove_node(node)
    release.set()
    wait_for(lambda: any(e["event"] == "failure" for e in events(run)), 60, "the failure")
    for _ in range(2):
        c.add_node(num_cpus=1)
    summary = job.result(timeout=400)
    assert summary["steps"] == 40
    rec = [e for e in events(run) if e["event"] == "recovered"][-1]
    assert rec["source"] == "checkpoint" and rec["resumed_at"] >= 10 and rec["resumed_at"] % 10 == 0
    assert losses(run) == reference  # the same layout, replayed from the checkpoint: bit for bit


def test_below_min_workers_the_job_waits_then_fails_clearly(two_nodes, tmp_path):
    from moe_cluster.cluster import JobFailed

    c, nodes = two_nodes
    job = _spread(two_workers(tmp_path, capacity_timeout_s=5.0))
    job.cluster.min_workers = 2
    controller = Controller(job, tmp_path, chunk_steps=2)
    run = Background(controller.run)
    wait_for(lambda: controller.step >= 5, 120, "step 5")
    c.remove_node(nodes[0])
    with pytest.raises(JobFailed, match=r"fewer than cluster.min_workers=2.*trainer.capacity_timeout_s=5"):
        run.result(timeout=180)
    assert events(tmp_path)[-1]["event"] == "failed"



@pytest.fixture
def three_nodes():
    with local_cluster(3) as cluster:
        yield cluster


def test_world_equal_ep_survives_a_node_through_the_copy_on_another_node(three_nodes, tmp_path, tmp_path_factory):
    # 2 workers at ep 2 on 2 of 3 nodes: no replica holds either rank's experts. The node of one
    # goes, and with it its worker, its object store and its own snapshots: the survivor holds the
    # only other copy (its keeper's), and the job goes on from it; the third node takes the
    # replacement, and the job grows back.
    c, nodes = three_nodes
    reference = reference_losses("two", two_workers, tmp_path_factory)
    run = tmp_path / "run"
    controller = _grows_back(Controller(_spread(two_workers(run)), run, chunk_steps=2))
    release = _held_at(controller, 8)
    job = Background(controller.run)
    wait_for(lambda: controller.step >= 8 and controller.group is not None, 120, "step 8")
    victim = controller.group.nodes[1]
    c.remove_node(next(n for n in nodes if n.node_id == victim))
    release.set()
    summary = job.result(timeout=400)
    assert summary["failures"] == 1 and summary["steps"] == 40
    (rec,) = [e for e in events(run) if e["event"] == "recovered"]
    assert rec["source"] == "peers" and rec["replaced_ranks"] == [1]
    resized = [e for e in events(run) if e["event"] == "resized"]
    assert [(e["to_world"], e["to_ep"], e["reason"]) for e in resized] == [(1, 1, "lost"), (2, 2, "grew")]
    _check_same_run(run, reference, failed_after=rec["resumed_at"], regrown_at=resized[1]["step"])
