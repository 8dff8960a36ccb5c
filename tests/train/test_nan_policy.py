"""A run that diverges stops as diverged (or skips, if asked), and no checkpoint holds NaN weights.

The non-finite steps are made by a forward hook on the embedding that turns its output to NaN for
the steps chosen (the loss and every gradient then follow, as in a real overflow). The Ray job that
diverges for real (a learning rate of 100) and fails as `diverged` with its last finite checkpoint
kept is tests/cluster/test_faults.py::test_a_diverged_run_*.
"""

from __future__ import annotations

import pytest
import torch

from moe_cluster.model import ModelConfig, MoEConfig
from moe_cluster.train import DataConfig, OptimConfig, TrainConfig, Trainer, checkpoint
from moe_cluster.train.step import Diverged

MODEL = ModelConfig(
    dim=64, n_layers=2, n_heads=4, max_seq_len=32, dense_hidden_dim=64, moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=64)
)
DATA = DataConfig(max_bytes=400_000)


def trainer(tmp_path=None, **kw) -> Trainer:
    cfg = TrainConfig(global_batch_size=8, seq_len=32, optim=OptimConfig(warmup_steps=2, decay_steps=30), **kw)
    return Trainer(MODEL, cfg, DATA, checkpoint_dir=str(tmp_path) if tmp_path else None)


def poison(t: Trainer, steps: set[int]):
    """NaN out of the embedding while the trainer runs one of ``steps`` (1-based)."""
    return t.model.embed.register_forward_hook(lambda m, i, out: out * float("nan") if t.step + 1 in steps else out)


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    state.update({f"optim.{i}.{k}": v.clone() for i, s in enumerate(t.optimizer.state.values()) for k, v in s.items()})
    return state


def test_stop_ends_the_run_at_the_first_non_finite_step_and_leaves_the_weights():
    t = trainer(nan_policy="stop")
    poison(t, {4})
    for _ in range(3):
        t.train_step()
    before = weights(t)
    with pytest.raises(Diverged, match=r"diverged at step 4: loss nan, gradient norm nan \(trainer.nan_policy=stop\)"):
        t.train_step()
    after = weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and AdamW moments: untouched


def test_skip_steps_over_bad_steps_up_to_the_limit_then_trains_on_or_stops():
    t = trainer(nan_policy="skip", max_nan_skips=3)
    hook = poison(t, {4, 5, 6, 9, 10, 11, 12})
    for _ in range(3):
        assert not t.train_step().get("skipped")
    before = weights(t)
    for step in (4, 5, 6):
        m = t.train_step()
        assert m["skipped"] and m["step"] == step and t.nan_skips == step - 3
    assert all(torch.equal(before[k], v) for k, v in weights(t).items())  # three steps left out entirely
    for step in (7, 8):  # the skips end, training goes on, the count starts again
        m = t.train_step()
        assert not m.get("skipped") and t.nan_skips == 0 and m["loss"] == m["loss"]
    for _ in range(3):
        assert t.train_step()["skipped"]
    with pytest.raises(Diverged, match=r"4 step\(s\) in a row, trainer.max_nan_skips=3"):
        t.train_step()
    hook.remove()


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
