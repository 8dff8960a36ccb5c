"""Expert parallelism over gloo process groups equals one process holding everything."""

import pytest
import torch

from moe_cluster.parallel import ParallelLayout
from moe_cluster.train.launch import launch
from tests.parallel import workers

# Float reassociation only: the same sums, in another order.
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def reference():
    ref = workers.one_step(ep=1)  # this process: all experts, the whole global batch
    assert ref["grad_norm"] > workers.train_config().optim.grad_clip  # clipping takes part
    return ref


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_ep_matches_single_process(reference, world, ep):
    results = launch(world, workers.one_step, ep)
    for rank, got in enumerate(results):
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6), rank
        assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), rank
        assert got["grads"].keys() <= reference["grads"].keys()
        for name, g in got["grads"].items():
            torch.testing.assert_close(g, reference["grads"][name], msg=f"rank {rank} grad {name}", **TOL)
        for name, p in got["params"].items():
            torch.testing.assert_close(p, reference["params"][name], msg=f"rank {rank} param {name}", **TOL)
    # Between them the ranks hold every expert of every layer.
    held = set().union(*(r["params"].keys() for r in results))
    assert held == set(reference["params"].keys())


def test_checkpoint_reshards_across_ep_sizes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    # EP=2 on 2 ranks: 2 steps, save, then steps 3 and 4 as the run would go on. Step 4's loss
    # depends on step 3's update, so on the optimizer state and expert bias the checkpoint holds.
    expected = launch(2, workers.losses, 2, 4, ckpt, 2)[0][2:]
    # EP=1 in this process, and EP=4 on 4 ranks, both resume from the EP=2 checkpoint.
    ep1 = workers.losses(1, 2, ckpt, None, True)
    ep4 = launch(4, workers.losses, 4, 2, ckpt, None, True)[0]
    assert ep1 == pytest.approx(expected, rel=1e-5)
    assert ep4 == pytest.approx(expected, rel=1e-5)


def test_resume_equals_uninterrupted_run(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    straight = launch(2, workers.losses, 2, 6)[0]
    first = launch(2, workers.losses, 2, 3, ckpt, 3)[0]
    rest = launch(2, workers.losses, 2, 3, ckpt, None, True)[0]
    assert first + rest == straight  # bitwise: same layout, same arithmetic


def test_layout_validation():
    with pytest.raises(ValueError, match="world size 6 is not divisible by parallel.ep=4"):
        ParallelLayout(6, 4, 8)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by parallel.ep=4"):
        ParallelLayout(8, 4, 6)
    layout = ParallelLayout(4, 2, 8)
    assert layout.ep_group_ranks(3) == [2, 3] and layout.expert_dp_ranks(3) == [1, 3]
    assert list(layout.local_experts(3)) == [4, 5, 6, 7]
