"""A run that diverges stops as diverged (or skips, if asked), and no checkpoint holds NaN weights.

The divergence is real: a learning rate of 100 after a 10-step warmup makes this model's
gradient norm overflow at step 16 (measured; every later step too). The Ray job that fails as
`diverged` with its last finite checkpoint kept is tests/cluster/test_faults.py::test_a_diverged_run_*.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_cluster.model import ModelConfig, MoEConfig
from moe_cluster.train import DataConfig, OptimConfig, TrainConfig, Trainer, checkpoint
from moe_cluster.train.step import Diverged

MODEL = ModelConfig(
    dim=64, n_layers=2, n_heads=4, max_seq_len=32, dense_hidden_dim=64, moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=64)
)
DATA = DataConfig(max_bytes=400_000)
DIVERGES_AT = 16


def trainer(tmp_path=None, **kw) -> Trainer:
    cfg = TrainConfig(global_batch_size=8, seq_len=32, optim=OptimConfig(lr=100.0, warmup_steps=10, decay_steps=30), **kw)
    return Trainer(MODEL, cfg, DATA, checkpoint_dir=str(tmp_path) if tmp_path else None)


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_stop_ends_the_run_at_the_first_non_finite_step_and_leaves_the_weights():
    t = trainer(nan_policy="stop")
    for _ in range(DIVERGES_AT - 1):
        t.train_step()
    before = weights(t)
    with pytest.raises(Diverged, match=rf"diverged at step {DIVERGES_AT}: .*trainer.nan_policy=stop"):
        t.train_step()
    after = weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad update never reached the weights


def test_skip_steps_over_bad_steps_up_to_the_limit_then_stops():
    t = trainer(nan_policy="skip", max_nan_skips=3)
    for _ in range(DIVERGES_AT - 1):
        assert not t.train_step().get("skipped")
    before = weights(t)
    for i in range(3):
        m = t.train_step()
        assert m["skipped"] and t.nan_skips == i + 1 and m["step"] == DIVERGES_AT + i
    assert all(torch.equal(before[k], v) for k, v in weights(t).items())
    with pytest.raises(Diverged, match=r"4 step\(s\) in a row, trainer.max_nan_skips=3"):
        t.train_step()


def test_a_non_finite_state_is_never_committed(tmp_path):
    t = trainer(tmp_path)
    t.train_step()
    good = t.save_checkpoint()
    with torch.no_grad():
        next(t.model.parameters())[0].fill_(float("nan"))
    t.step += 1
    with pytest.raises(checkpoint.NonFiniteState, match="not committing the checkpoint of step 2"):
        t.save_checkpoint()
    assert checkpoint.latest_checkpoint(tmp_path) == good
    assert not checkpoint.step_dir(tmp_path, 2).exists()  # refused before anything was written


def test_retention_never_prunes_the_newest_finite_checkpoint(tmp_path):
    """Checkpoints this version writes are all finite; older ones did not say. Retention keeps the
    newest one known to be finite, whatever ``keep`` says."""
    t = trainer(tmp_path, keep_checkpoints=10)
    for _ in range(3):
        t.train_step()
        t.save_checkpoint()
    finite_one = checkpoint.step_dir(tmp_path, 1)
    for step in (2, 3):  # as older versions wrote them: nothing said about finiteness
        marker = checkpoint.step_dir(tmp_path, step) / checkpoint.MARKER
        info = json.loads(marker.read_text())
        info.pop("finite")
        marker.write_text(json.dumps(info))
    checkpoint._prune(tmp_path, keep=1)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [1, 3] and finite_one.exists()
