"""The Trainer on prepared BPE data: a mixture trains, evaluates, and resumes where it stopped."""

import dataclasses

import pytest

from moe_cluster.data import MixtureSource, prepare
from moe_cluster.train import DataConfig, Trainer
from tests.data.helpers import documents, train_bpe, write_jsonl
from tests.parallel.workers import small_model, train_config


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("mixture")
    docs = documents(400)
    bpe = train_bpe(root / "bpe", docs)
    for name, part in (("a", docs[:250]), ("b", docs[250:])):
        prepare(write_jsonl(root / f"{name}.jsonl", part), root / name, tokenizer=str(bpe), val_every=4)
    return DataConfig(source="bin", mixture=[MixtureSource(str(root / "a"), 0.7), MixtureSource(str(root / "b"), 0.3)])


def test_a_mixture_resumes_from_a_checkpoint_exactly(tmp_path, mixture):
    model = small_model()  # the torch expert backend: this test is about data, not kernels
    model = dataclasses.replace(model, vocab_size=500, moe=dataclasses.replace(model.moe, backend="torch"))
    a = Trainer(model, train_config(eval_batches=1), mixture, checkpoint_dir=str(tmp_path))
    for _ in range(3):
        a.train_step()
    a.save_checkpoint()
    state = a.sampler.state_dict()
    assert state["step"] == 3 and sum(state["source_positions"]) == 3 * 8
    after = [a.train_step()["loss"] for _ in range(2)]
    b = Trainer(model, train_config(eval_batches=1), mixture, checkpoint_dir=str(tmp_path))
    assert b.resume() and b.sampler.state_dict() == state
    assert [b.train_step()["loss"] for _ in range(2)] == after
    assert 0 < a.evaluate() < 10 and a.evaluate() == a.evaluate()  # the same validation windows each time


def test_the_vocabulary_must_be_resolved_first(mixture):
    with pytest.raises(ValueError, match="model.vocab_size is null .* moe_cluster.config.assemble"):
        Trainer(dataclasses.replace(small_model(), vocab_size=None), train_config(), mixture)
    with pytest.raises(ValueError, match=r"ids up to 499 .* model.vocab_size=256; raise model.vocab_size to at least 500"):
        Trainer(small_model(), train_config(), mixture)
