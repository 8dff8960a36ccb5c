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
