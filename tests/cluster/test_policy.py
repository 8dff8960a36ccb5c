"""The controller's pure decisions, without Ray."""

import pytest

from moe_cluster.cluster.policy import (
    Decision,
    Failure,
    FailureKind,
    State,
    check_transition,
    next_chunk,
    on_failure,
)


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


def test_state_machine_transitions():
    check_transition(State.STARTING, State.RUNNING)
    check_transition(State.RUNNING, State.RECOVERING)
    check_transition(State.RECOVERING, State.RUNNING)
    check_transition(State.RUNNING, State.FINISHED)
    for old, new in [(State.FINISHED, State.RUNNING), (State.FAILED, State.RECOVERING), (State.STARTING, State.FINISHED)]:
        with pytest.raises(RuntimeError, match="cannot go from"):
            check_transition(old, new)


def _layout(available, **kw):
    from moe_cluster.cluster.policy import choose_layout

    base = dict(target=4, ep=2, grad_accum=1, num_experts=8, global_batch_size=16)
    base.update(kw)
    return choose_layout(available, **base)


def test_layout_keeps_the_global_batch_and_ep_when_it_can():
    from moe_cluster.cluster.policy import Layout

    assert _layout(4) == Layout(4, 2, 1)  # nothing lost
    assert _layout(6) == Layout(4, 2, 1)  # never past the configured size
    assert _layout(2) == Layout(2, 2, 2)  # half the ranks: twice the micro-batches, same batch
    assert _layout(1) == Layout(1, 1, 4)  # one rank holds every expert
    # 3 survivors: 16 sequences do not split over 3 ranks, so 2 it is (ep kept).
    assert _layout(3) == Layout(2, 2, 2)
    # With a batch that splits over 3: 3 ranks, and ep must change (3 is no multiple of 2; 8 experts
    # do not split 3 ways), so every rank holds every expert.
    assert _layout(3, global_batch_size=24) == Layout(3, 1, 2)
    # 6 experts split 3 ways: ep 3 beats ep 1 (less expert memory per rank).
    assert _layout(3, global_batch_size=24, num_experts=6) == Layout(3, 3, 2)


def test_layout_respects_memory_and_the_minimum():
    from moe_cluster.cluster.policy import Layout

    # A rank can hold at most half the experts: ep 1 does not fit, so 3 survivors run as 2.
    half = lambda world, ep: ep >= 2  # noqa: E731
    assert _layout(3, global_batch_size=24, fits=half) == Layout(2, 2, 2)
    assert _layout(1, fits=half) is None
    assert _layout(1, min_workers=2) is None
    assert _layout(2, min_workers=2) == Layout(2, 2, 2)
    # Micro-batches never grow past the configured one (it sized the activations).
    assert _layout(2, grad_accum=2) == Layout(2, 2, 4)
    assert _layout(0) is None  # every worker lost: wait for replacements
    with pytest.raises(ValueError):
        _layout(2, target=0)


def test_ranks_go_to_survivors_that_hold_their_experts():
    from moe_cluster.cluster.policy import Layout, assign_ranks, snapshot_sources

    old = Layout(4, 2, 1)  # ranks 0, 2 hold expert slice 0; ranks 1, 3 slice 1
    # Rank 1 lost: survivors 0, 2, 3 and no new worker; the layout shrinks to 2 ranks, ep 2.
    new = Layout(2, 2, 2)
    members = [0, 2, 3]
    chosen = assign_ranks(members, old, new)
    assert [members[i] for i in chosen] == [0, 3]  # slice 0 on old rank 0, slice 1 on old rank 3
    assert snapshot_sources(1, new, 3, old, alive={0, 2, 3}, num_experts=8) == [3]  # nothing moves
    # Back to 4: the 2 current ranks keep their places; the newcomers (None: a replacement, or a
    # survivor the shrink left out, which restores like a newcomer) take the rest.
    members = [0, 1, None, None]
    chosen = assign_ranks(members, new, old)
    assert [members[i] for i in chosen] == [0, 1, None, None]
    assert snapshot_sources(3, old, None, new, alive={0, 1}, num_experts=8) == [1]  # slice 1: current rank 1
    assert snapshot_sources(2, old, None, new, alive={0, 1}, num_experts=8) == [0]
    # ep changes (2 -> 1 on one survivor): it needs both slices, its own first.
    one = Layout(1, 1, 4)
    assert snapshot_sources(0, one, 1, Layout(2, 2, 2), alive={1}, num_experts=8) == [1, 0]
    # A lost holder's snapshot is used only when no survivor holds the slice.
    assert snapshot_sources(0, Layout(2, 1, 2), 0, old, alive={0, 3}, num_experts=8) == [0, 3]
    with pytest.raises(ValueError):
        assign_ranks([0], old, new)


def test_a_ranks_copy_is_kept_on_another_node():
    from moe_cluster.cluster.policy import keepers

    assert keepers(["a", "a"]) == [1, 0]  # one node: the next rank
    assert keepers(["a", "b"]) == [1, 0]
    assert keepers(["a", "a", "b", "b"]) == [2, 2, 0, 0]  # never on its own node
    assert keepers(["a", "b", "c"]) == [1, 2, 0]
