"""Expert parallelism over gloo process groups equals one process holding everything."""

import pytest
import torch

from moe_cluster.parallel import Layout
from moe_cluster.train.launch import launch
from tests.parallel import workers

# Float reassociation only: the same sums, in another order.
TOL = dict(atol=2e-5, rtol=1e-4)


def assert_grads_close(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    # Gradients after clipping are ~1e-4 and smaller, under TOL's atol: scale it to the tensor.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12, msg=msg)


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
            assert_grads_close(g, reference["grads"][name], f"rank {rank} grad {name}")
        for name, p in got["params"].items():
            torch.testing.assert_close(p, reference["params"][name], msg=f"rank {rank} param {name}", **TOL)
    # Between them the ranks hold every expert of every layer.
    held = set().union(*(r["params"].keys() for r in results))
    assert held == set(reference["params"].keys())


def test_ep_with_capacity_dropping_matches_ep1_on_the_same_ranks():
    # Capacity is decided per rank, per micro-batch, over that rank's own tokens
    # (ceil(cf * T_rank * K / E), as in GShard and Megatron): the drops depend on how the batch
    # is split over ranks, not on how the experts are. So EP=2 equals EP=1 on the same 2 ranks
    # (each rank all experts), drops included; not one process holding the whole batch.
    cf = 0.75  # 64 tokens x 2 slots per rank and layer over 4 experts of 24 rows: 32+ slots dropped
    sharded, replicated = zip(*launch(2, workers.in_turn, [(workers.one_step, 2, cf), (workers.one_step, 1, cf)]))
    assert replicated[0]["dropped"] > 0  # drops really happen
    for rank, (got, want) in enumerate(zip(sharded, replicated)):
        # The same number of (token, slot) pairs dropped, and below, the same loss and gradients.
        assert got["dropped"] == want["dropped"], f"rank {rank}: EP=2 dropped {got['dropped']}, EP=1 {want['dropped']}"
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), rank
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), rank
        assert got["grads"].keys() < want["grads"].keys()  # EP=2 holds half of the experts
        for name, g in got["grads"].items():
            assert_grads_close(g, want["grads"][name], f"rank {rank} grad {name}")
        for name, p in got["params"].items():
            torch.testing.assert_close(p, want["params"][name], msg=f"rank {rank} param {name}", **TOL)
    # One process holding the whole batch has twice the tokens per capacity decision: other
    # drops, so other expert gradients (the loss barely moves at init: the experts add little).
    single = workers.one_step(1, cf)
    assert single["dropped"] != replicated[0]["dropped"]
    expert_grads = [n for n in single["grads"] if ".experts." in n]
    gap = max(float((single["grads"][n] - replicated[0]["grads"][n]).abs().max() / single["grads"][n].abs().max())
              for n in expert_grads)  # fmt: skip
    assert gap > 0.1, gap


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
    straight, first = launch(2, workers.in_turn, [(workers.losses, 2, 6), (workers.losses, 2, 3, ckpt, 3)])[0]
    rest = launch(2, workers.losses, 2, 3, ckpt, None, True)[0]  # a fresh process: all it knows is in the checkpoint
    assert first + rest == straight  # bitwise: same layout, same arithmetic


def test_layout_validation():
    with pytest.raises(ValueError, match="num_workers=6 is not a multiple of parallel.ep=4; use 4 or 8 workers"):
        Layout(6, 4, num_experts=8)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by parallel.ep=4"):
        Layout(8, 4, num_experts=6)
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by cluster.num_workers=4 x"):
        Layout(4, 2, num_experts=8, global_batch_size=6)
    with pytest.raises(ValueError, match="parallel.fsdp=true shards the native engine"):
        Layout.resolve(world=2, ep=1, num_experts=8, fsdp=True, engine="deepspeed")
    # The FSDP rule, in one place: null is on for the native engine, and one rank never shards.
    assert Layout.resolve(world=2, ep=1, num_experts=8).fsdp
    assert not Layout.resolve(world=1, ep=1, num_experts=8).fsdp
    assert not Layout.resolve(world=2, ep=1, num_experts=8, fsdp=False).fsdp
    assert not Layout.resolve(world=2, ep=1, num_experts=8, engine="deepspeed").fsdp
    assert Layout.resolve(world=4, ep=2, num_experts=8).resized(1, 1, 4).fsdp is False  # a shrink to one rank
    assert Layout.resolve(world=4, ep=2, num_experts=8).resized(1, 1, 4).resized(2, 2, 2).fsdp  # and back
    layout = Layout(4, 2, num_experts=8)
    assert layout.ep_group_ranks(3) == [2, 3] and layout.expert_dp_ranks(3) == [1, 3]
    assert list(layout.local_experts(3)) == [4, 5, 6, 7]


def test_snapshots_roll_back_exactly_and_rebuild_a_rank_of_another_layout():
    # What recovery from peers' memory rests on: a rank's host snapshot undoes later steps bit for
    # bit, and the snapshots of an EP=2 group, merged, rebuild an EP=1 rank that trains on alike.
    out = launch(2, workers.snapshot_and_rollback, 2)
    for rank in out:
        assert rank["again"] == rank["ahead"]
    merged = {**out[0]["snapshot"], **out[1]["snapshot"]}
    rebuilt = workers.restore_from(merged, 1)
    assert rebuilt == pytest.approx(out[0]["ahead"], rel=1e-5)
    with pytest.raises(ValueError, match="the snapshot lacks"):
        workers.restore_from(out[0]["snapshot"], 1)  # one EP=2 rank's snapshot holds half the experts
