"""The step loop the Ray worker and train/local.py share: what is evaluated and checkpointed when."""

import json

import pytest

from moe_cluster.train import Trainer, checkpoint, local
from moe_cluster.train.loop import due, steps
from tests.parallel.workers import DATA, small_model, train_config


@pytest.mark.parametrize(
    "step, every, max_steps, want",
    [(2, 2, 5, True), (3, 2, 5, False), (5, 2, 5, True), (5, 0, 5, False), (6, 3, 10, True), (7, 3, 10, False)],
)
def test_due_on_multiples_and_at_the_last_step(step, every, max_steps, want):
    assert due(step, every, max_steps) is want


def test_local_run_evaluates_and_checkpoints_the_last_step(tmp_path, capsys):
    # max_steps=5 is no multiple of 2: step 5 is evaluated and checkpointed all the same, as the
    # Ray workers do (local.py once stopped at the checkpoint of step 4).
    train = train_config(max_steps=5, eval_every=2, checkpoint_every=2, eval_batches=1, keep_checkpoints=5)
    history = local.run(small_model(), train, DATA, ep=1, out=str(tmp_path))
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5]
    assert [m["step"] for m in history if "val_loss" in m] == [2, 4, 5]
    assert [m["step"] for m in history if m.get("checkpoint")] == [2, 4, 5]
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "checkpoints")] == [2, 4, 5]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5] and "val " in capsys.readouterr().out
    # A second run resumes from the last step's checkpoint: nothing is left to do.
    assert local.run(small_model(), train, DATA, ep=1, out=str(tmp_path)) == []


def test_steps_runs_a_chunk_and_calls_stepped_before_evaluating():
    trainer = Trainer(small_model(), train_config(max_steps=3, eval_every=3, eval_batches=1), DATA)
    calls = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: calls.append(("evaluate", trainer.step)) or evaluate()
    chunk = steps(trainer, 2, stepped=lambda: calls.append(("stepped", trainer.step)))
    assert [m["step"] for m in chunk] == [1, 2] and trainer.step == 2  # a chunk, as the worker runs
    assert [m["step"] for m in steps(trainer, 1, stepped=lambda: calls.append(("stepped", trainer.step)))] == [3]
    assert calls == [("stepped", 1), ("stepped", 2), ("stepped", 3), ("evaluate", 3)]
