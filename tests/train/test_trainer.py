"""Single-process training: checkpoints (markers, keep-last-N), accumulation, errors, learning."""

import pytest
import torch

from moe_cluster.train import DataConfig, Trainer, checkpoint
from moe_cluster.train.trainer import local_layout
from tests.parallel.workers import DATA, make_trainer, small_model, train_config


def test_incomplete_checkpoints_are_skipped_and_old_ones_pruned(tmp_path):
    trainer = make_trainer(1, str(tmp_path), keep_checkpoints=2)
    for _ in range(3):
        trainer.train_step()
        trainer.save_checkpoint()
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 3]
    # A save cut short: the directory exists, the marker does not.
    (tmp_path / "step_00000009").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000003"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.load(tmp_path / "step_00000009", {})
    resumed = make_trainer(1, str(tmp_path))
    assert resumed.resume() and resumed.step == 3


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer = make_trainer(1, str(tmp_path / "none"))
    assert not trainer.resume() and trainer.step == 0


def test_gradient_accumulation_equals_one_big_batch():
    # The balancing loss is computed per micro-batch (its expert shares are not linear in the
    # batch), so it is off here; everything else must match.
    model = small_model(aux_loss_coef=0.0)
    a = Trainer(model, train_config(grad_accum=1), DATA)
    b = Trainer(model, train_config(grad_accum=4), DATA)
    for _ in range(2):
        la, lb = a.train_step()["loss"], b.train_step()["loss"]
        assert la == pytest.approx(lb, rel=1e-5)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4, msg=name)


def test_same_layout_is_bitwise_reproducible():
    a, b = make_trainer(1), make_trainer(1)
    assert [a.train_step()["loss"] for _ in range(3)] == [b.train_step()["loss"] for _ in range(3)]
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


def test_checkpoint_carries_the_expert_bias(tmp_path):
    a = make_trainer(1, str(tmp_path))
    a.train_step()  # one update: every bias moves by +-bias_update_rate
    a.save_checkpoint()
    bias = a.model.moe_layers()[0].router.expert_bias.clone()
    assert bias.abs().sum() > 0
    b = make_trainer(1, str(tmp_path))
    b.resume()
    torch.testing.assert_close(b.model.moe_layers()[0].router.expert_bias, bias)


def test_training_reduces_validation_loss():
    trainer = make_trainer(1, max_steps=40)
    before = trainer.evaluate()
    for _ in range(40):
        trainer.train_step()
    assert trainer.evaluate() < before - 0.5


def test_trainer_errors():
    with pytest.raises(ValueError, match="trainer.seq_len=64 exceeds model.max_seq_len=32"):
        Trainer(small_model(), train_config(seq_len=64), DATA)
    with pytest.raises(ValueError, match="divisible by parallel.ep=3"):
        Trainer(small_model(), train_config(), DATA, local_layout(small_model(), train_config(), ep=3))
    with pytest.raises(ValueError, match="data.source='web' is unknown"):
        Trainer(small_model(), train_config(), DataConfig(source="web"))
    with pytest.raises(ValueError, match="data.source=bin needs data.path"):
        Trainer(small_model(), train_config(), DataConfig(source="bin"))
    with pytest.raises(ValueError, match="grad_accum=3"):
        Trainer(small_model(), train_config(grad_accum=3), DATA)


def test_resume_refuses_another_architecture_and_unreadable_shards(tmp_path):
    trainer = make_trainer(1, str(tmp_path))
    trainer.train_step()
    path = trainer.save_checkpoint()
    assert checkpoint.read_info(path)["model_config"]["dim"] == 32
    other = small_model(num_experts=8)
    other.n_heads = 2
    with pytest.raises(ValueError, match=r"model.moe.num_experts: checkpoint 4, job 8; model.n_heads: checkpoint 4, job 2"):
        Trainer(other, train_config(), DATA, checkpoint_dir=str(tmp_path)).resume(path)
    # Keys that set how a model is trained, not what it is, may change on resume.
    retuned = small_model(aux_loss_coef=0.5)
    retuned.moe.backend = "torch"
    assert Trainer(retuned, train_config(), DATA, checkpoint_dir=str(tmp_path)).resume(path)

    (shard,) = path.glob("*.distcp")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside a tensor: DCP alone would load it
    shard.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointCorrupt, match="does not match its checksum"):
        make_trainer(1, str(tmp_path)).resume(path)
    shard.write_bytes(bytes(raw[:100]))
    assert "shorter than" in checkpoint.verify(path)
    shard.unlink()
    with pytest.raises(checkpoint.CheckpointCorrupt, match="is missing"):
        make_trainer(1, str(tmp_path)).resume(path)
    moved = checkpoint.set_aside(path)
    assert moved.name == "step_00000001.corrupt" and checkpoint.latest_checkpoint(tmp_path) is None


def test_init_from_needs_its_loader():
    # The Trainer never reads model.init_from itself: the job's assembly resolves it (config.assemble).
    cfg = small_model()
    cfg.init_from = "hf:/x"
    with pytest.raises(ValueError, match="model.init_from='hf:/x' needs its weights loader"):
        Trainer(cfg, train_config(), DATA)


def test_a_step_that_fails_part_way_leaves_no_graph_on_the_layers():
    # A peer lost in the middle of a forward: the layers already run must not keep their losses,
    # whose graph (under FSDP, through its backward hooks) would keep the model and its process
    # groups alive, and the peers blocked on this rank waiting for the groups' timeout.
    trainer = Trainer(small_model(), train_config(), DATA)
    assert len(trainer.model.moe_layers()) == 2

    def lost_peer(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    trainer.model.blocks[1].forward = lost_peer
    with pytest.raises(RuntimeError, match="closed by peer"):
        trainer.train_step()
    assert [layer.aux_loss for layer in trainer.model.moe_layers()] == [None, None]
