"""FSDP2 sharded state (parallel.fsdp) over gloo: the same training as one process holding everything.

One 4-rank run per expert sharding (by whole experts, and by rows when the local experts do not
divide over their expert-data-parallel group) gives the gradients, the state's bytes, a checkpoint
and the ranks' snapshots; other layouts then load those.
"""

from functools import partial

import pytest
import torch

from moe_cluster.parallel import Layout, expert_shard_dim
from moe_cluster.train.launch import launch
from tests.parallel import fsdp_workers as fw

WORLD, EP = 4, 2


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.fixture(scope="module", params=[4, 2], ids=["whole-experts", "expert-rows"])
def sharded(request, tmp_path_factory):
    num_experts = request.param
    per_rank = Layout(WORLD, EP, num_experts=num_experts).experts_per_rank
    assert expert_shard_dim(per_rank, WORLD // EP) == {4: 0, 2: 1}[num_experts]  # both paths taken
    ckpt = str(tmp_path_factory.mktemp(f"fsdp{num_experts}"))
    return {
        "num_experts": num_experts,
        "checkpoint_dir": ckpt,
        "reference": fw.run(1, False, num_experts=num_experts),  # this process, everything on it
        "ranks": launch(WORLD, partial(fw.run, num_experts=num_experts), EP, True, ckpt),
    }


def test_loss_and_every_gradient_equal_one_process(sharded):
    # Three steps, two micro-batches each (the reduce-scatter deferred to the last), clipping on.
    reference = sharded["reference"]["steps"]
    assert reference[0]["grad_norm"] > fw.workers.train_config().optim.grad_clip  # clipping takes part
    for rank, got in enumerate(sharded["ranks"]):
        for step, (g, want) in enumerate(zip(got["steps"], reference)):
            assert g["loss"] == pytest.approx(want["loss"], rel=1e-6), (rank, step)
            assert g["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), (rank, step)
            assert g["grads"].keys() == want["grads"].keys() or g["grads"].keys() < want["grads"].keys()
            # Step 0 is fed the same parameters: 1e-6. Later steps start from parameters that
            # differ by float reassociation (the same sums over ranks, in another order; unsharded
            # EP at this layout differs from one process by the same amount), so they get 5e-6.
            # A missing divide factor on the expert group, or a reduce over the wrong group,
            # is off by a factor of 2 or more.
            tol = 1e-6 if step == 0 else 5e-6
            for name, grad in g["grads"].items():
                assert relative(grad, want["grads"][name]) < tol, (rank, step, name)
    held = set().union(*(r["steps"][0]["grads"].keys() for r in sharded["ranks"]))
    assert held == set(reference[0]["grads"].keys())  # between them the ranks hold every expert


def test_each_rank_holds_a_quarter_of_the_state(sharded):
    whole = sharded["reference"]["bytes"]
    for rank, got in enumerate(sharded["ranks"]):
        for kind in ("params", "optimizer"):
            # Shards of uneven tensors are up to one row apart: within 2% of a quarter.
            assert got["bytes"][kind] == pytest.approx(whole[kind] / WORLD, rel=0.02), (rank, kind)
        assert got["bytes"]["optimizer"] == 2 * got["bytes"]["params"]  # AdamW's two moments per shard


@pytest.mark.parametrize("world,ep,fsdp", [(1, 1, False), (2, 1, True), (WORLD, 4, True)])
def test_checkpoint_and_snapshots_load_at_another_layout(sharded, world, ep, fsdp):
    ep = min(ep, sharded["num_experts"])  # 2 experts: ep 2 at world 4, by rows again
    next_loss = sharded["ranks"][0]["steps"][2]["loss"]  # the written layout's step after the save
    snapshots = [r["snapshot"] for r in sharded["ranks"]] if world < WORLD else None
    fn = partial(fw.resume_and_restore, num_experts=sharded["num_experts"])
    args = (ep, fsdp, sharded["checkpoint_dir"], snapshots)
    results = launch(world, fn, *args) if world > 1 else [fn(*args)]
    for rank, (resumed, restored) in enumerate(results):
        assert resumed == pytest.approx(next_loss, rel=1e-6), rank
        if restored is not None:
            assert restored == pytest.approx(next_loss, rel=1e-6), rank
