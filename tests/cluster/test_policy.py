"""The controller's pure decisions and its state machine's transitions, without Ray."""

import pytest

from moe_cluster.cluster.failures import Decision, Failure, FailureKind, on_failure
from moe_cluster.cluster.policy import assign_ranks, choose_layout, keepers, lost_ranks, next_chunk, snapshot_sources
from moe_cluster.cluster.states import (
    Done, Failed, Healing, Recovery, Restarting, Resizing, Running, Starting, check_transition,
)  # fmt: skip
from moe_cluster.parallel.layout import Layout


def L(world, ep, grad_accum, num_experts=8):  # noqa: N802 - a layout of the tests' job, by its shape
    return Layout(world, ep, grad_accum, num_experts=num_experts)


def test_restart_until_the_budget_is_spent():
    f = Failure(FailureKind.ACTOR_DIED, "worker 1 died", step=7)
    assert on_failure(f, failures_so_far=0, max_failures=2) is Decision.RESTART
    assert on_failure(f, failures_so_far=1, max_failures=2) is Decision.RESTART
    assert on_failure(f, failures_so_far=2, max_failures=2) is Decision.GIVE_UP
    assert on_failure(f, failures_so_far=0, max_failures=0) is Decision.GIVE_UP
    hang = Failure(FailureKind.HANG, "no result", step=3)
    assert on_failure(hang, 0, 1) is Decision.RESTART


def test_missing_capacity_and_invalid_input_are_final():
    for kind in (FailureKind.CAPACITY, FailureKind.INVALID):
        f = Failure(kind, "could not place / bad input", step=3)
        assert on_failure(f, failures_so_far=0, max_failures=5) is Decision.GIVE_UP


def test_an_unreadable_checkpoint_is_set_aside_without_spending_the_budget():
    f = Failure(FailureKind.CORRUPT_CHECKPOINT, "shard missing", step=0, checkpoint="/c/step_00000010")
    assert on_failure(f, failures_so_far=0, max_failures=0) is Decision.SET_ASIDE
    assert on_failure(f, failures_so_far=3, max_failures=3) is Decision.SET_ASIDE


@pytest.mark.parametrize(
    "step,max_steps,ckpt,chunk,recovered,expected",
    [
        (0, 100, 50, 10, False, 10),
        (45, 100, 50, 10, False, 5),  # stop at the checkpoint boundary
        (50, 100, 50, 10, False, 10),
        (97, 100, 50, 10, False, 3),  # the end of the job
        (40, 100, 50, 10, True, 1),  # one step right after a recovery
        (100, 100, 50, 10, False, 0),
        (3, 100, 0, 10, False, 10),  # checkpoints off
    ],
)
def test_next_chunk(step, max_steps, ckpt, chunk, recovered, expected):
    assert next_chunk(step, max_steps, ckpt, chunk, recovered) == expected


@pytest.mark.parametrize(
    "step,ckpt,chunk,recovered,snapshot_every,expected",
    [
        (0, 50, 10, False, 1, 1),  # recovery=peers, a commit every step
        (0, 50, 10, False, 4, 4),  # a chunk ends in a commit
        (45, 50, 10, False, 8, 5),  # and still at the checkpoint boundary
        (40, 50, 10, True, 4, 1),  # one step after a recovery
        (0, 50, 10, False, 20, 10),  # a commit interval longer than a chunk changes nothing
        (0, 50, 10, False, None, 10),  # recovery=checkpoint: no commits
    ],
)
def test_next_chunk_ends_in_a_commit(step, ckpt, chunk, recovered, snapshot_every, expected):
    assert next_chunk(step, 100, ckpt, chunk, recovered, snapshot_every) == expected
    assert next_chunk(100, 100, ckpt, chunk, recovered, snapshot_every) == 0  # the job is done


def test_state_machine_transitions():
    failure = Failure(FailureKind.ACTOR_DIED, "worker 1 died", step=7)
    starting, running, done = Starting(), Running(), Done({"steps": 7})
    healing, restarting = Healing(failure, 0.0, None), Restarting(failure, 0.0)
    resizing, failed = Resizing(L(4, 2, 1), ()), Failed("given up", failure)
    check_transition(starting, running)
    check_transition(starting, restarting)  # the first start fails like any later one
    check_transition(running, healing)
    check_transition(healing, Running(Recovery(0.0, 0, "peers", (1,))))
    check_transition(healing, restarting)  # a heal that fails falls back to the checkpoint
    check_transition(restarting, restarting)  # the restart failed too
    check_transition(restarting, running)
    check_transition(running, resizing)
    check_transition(resizing, Running(resized=True))
    check_transition(running, done)
    for state in (starting, running, resizing, healing, restarting):
        check_transition(state, failed)  # the policy gives up
    refused = [(done, running), (failed, restarting), (starting, done), (starting, healing), (restarting, healing)]
    for old, new in refused:
        with pytest.raises(RuntimeError, match="cannot go from"):
            check_transition(old, new)
    assert done.terminal and failed.terminal and not any(s.terminal for s in (starting, running, healing, restarting))


def _layout(available, target=4, ep=2, grad_accum=1, num_experts=8, global_batch_size=16, **kw):
    job = Layout(target, ep, grad_accum, num_experts=num_experts, global_batch_size=global_batch_size, shard=True)
    layout = choose_layout(available, job, **kw)
    if layout is not None:  # the job's layout, resized: every other field is the job's
        assert (layout.num_experts, layout.global_batch_size, layout.shard) == (num_experts, global_batch_size, True)
    return None if layout is None else layout.shape


def test_layout_keeps_the_global_batch_and_ep_when_it_can():
    assert _layout(4) == (4, 2, 1)  # nothing lost
    assert _layout(6) == (4, 2, 1)  # never past the configured size
    assert _layout(2) == (2, 2, 2)  # half the ranks: twice the micro-batches, same batch
    assert _layout(1) == (1, 1, 4)  # one rank holds every expert
    # 3 survivors: 16 sequences do not split over 3 ranks, so 2 it is (ep kept).
    assert _layout(3) == (2, 2, 2)
    # With a batch that splits over 3: 3 ranks, and ep must change (3 is no multiple of 2; 8 experts
    # do not split 3 ways), so every rank holds every expert.
    assert _layout(3, global_batch_size=24) == (3, 1, 2)
    # 6 experts split 3 ways: ep 3 beats ep 1 (less expert memory per rank).
    assert _layout(3, global_batch_size=24, num_experts=6) == (3, 3, 2)


def test_layout_respects_memory_and_the_minimum():
    # A rank can hold at most half the experts: ep 1 does not fit, so 3 survivors run as 2.
    half = lambda world, ep: ep >= 2  # noqa: E731
    assert _layout(3, global_batch_size=24, fits=half) == (2, 2, 2)
    assert _layout(1, fits=half) is None
    assert _layout(1, min_workers=2) is None
    assert _layout(2, min_workers=2) == (2, 2, 2)
    # Micro-batches never grow past the configured one (it sized the activations).
    assert _layout(2, grad_accum=2) == (2, 2, 4)
    assert _layout(0) is None  # every worker lost: wait for replacements
    with pytest.raises(ValueError):
        _layout(2, target=0)


def test_a_heal_replaces_the_named_the_stuck_and_the_silent():
    assert lost_ranks([1], stuck=set(), silent=set()) == [1]  # a SIGKILLed rank, found dead
    assert lost_ranks((), stuck={2}, silent=()) == [2]  # a survivor blocked in a collective
    assert lost_ranks([3], stuck={0, 3}, silent=[3]) == [0, 3]  # each rank once, sorted
    assert lost_ranks([], set(), set()) == []  # nothing points at a rank: no heal


def test_ranks_go_to_survivors_that_hold_their_experts():
    old = L(4, 2, 1)  # ranks 0, 2 hold expert slice 0; ranks 1, 3 slice 1
    # Rank 1 lost: survivors 0, 2, 3 and no new worker; the layout shrinks to 2 ranks, ep 2.
    new = L(2, 2, 2)
    members = [0, 2, 3]
    chosen = assign_ranks(members, old, new)
    assert [members[i] for i in chosen] == [0, 3]  # slice 0 on old rank 0, slice 1 on old rank 3
    assert snapshot_sources(1, new, 3, old, alive={0, 2, 3}) == [3]  # nothing moves
    # Back to 4: the 2 current ranks keep their places; the newcomers (None: a replacement, or a
    # survivor the shrink left out, which restores like a newcomer) take the rest.
    members = [0, 1, None, None]
    chosen = assign_ranks(members, new, old)
    assert [members[i] for i in chosen] == [0, 1, None, None]
    assert snapshot_sources(3, old, None, new, alive={0, 1}) == [1]  # slice 1: current rank 1
    assert snapshot_sources(2, old, None, new, alive={0, 1}) == [0]
    # ep changes (2 -> 1 on one survivor): it needs both slices, its own first.
    one = L(1, 1, 4)
    assert snapshot_sources(0, one, 1, L(2, 2, 2), alive={1}) == [1, 0]
    # A lost holder's snapshot is used only when no survivor holds the slice.
    assert snapshot_sources(0, L(2, 1, 2), 0, old, alive={0, 3}) == [0, 3]
    with pytest.raises(ValueError):
        assign_ranks([0], old, new)


def test_a_ranks_copy_is_kept_on_another_node():
    assert keepers(["a", "a"]) == [1, 0]  # one node: the next rank
    assert keepers(["a", "b"]) == [1, 0]
    assert keepers(["a", "a", "b", "b"]) == [2, 2, 0, 0]  # never on its own node
    assert keepers(["a", "b", "c"]) == [1, 2, 0]


def test_a_sharded_layouts_new_rank_reads_every_old_rank():
    old = Layout(4, 2, 1, num_experts=8, shard=True)  # FSDP: every rank holds a piece of every tensor
    assert old.fsdp and not Layout(1, 1, 4, num_experts=8, shard=True).fsdp  # one rank never shards
    assert snapshot_sources(0, L(2, 2, 2), 2, old, alive={0, 2, 3}, sharded=old.fsdp) == [2, 0, 1, 3]
    assert snapshot_sources(1, L(2, 2, 2), None, old, alive={0}, sharded=old.fsdp) == [0, 1, 2, 3]


def test_failures_named_by_the_controller_are_classified_without_ray():
    import errno

    from moe_cluster.cluster.failures import CapacityError, Hang, Lost, classify

    hang = classify(Hang("no result", [1]), step=3)
    assert (hang.kind, hang.ranks, hang.step) == (FailureKind.HANG, (1,), 3)
    lost = classify(Lost(RuntimeError("actor gone"), [0, 2]), step=4)
    assert (lost.kind, lost.ranks) == (FailureKind.ACTOR_DIED, (0, 2)) and "rank(s) [0, 2] died" in lost.message
    assert classify(CapacityError("no room"), step=0).kind is FailureKind.CAPACITY
    assert classify(OSError(errno.ENOSPC, "No space left on device"), step=5).kind is FailureKind.STORAGE
    assert classify(RuntimeError("boom"), step=5).message == "RuntimeError: boom"
