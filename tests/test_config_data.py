"""data=bin through Hydra: model.vocab_size from the data, and data.mixture checked before anything starts."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_cluster.config import JobConfig, assemble, register_configs, validate
from moe_cluster.data import prepare
from tests.data.helpers import documents, train_bpe, write_jsonl

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def job(*overrides) -> JobConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = documents(600)  # each split holds one global batch of the default shape (16 x 128 tokens)
    bpe = train_bpe(root / "bpe", docs)
    for name, tok in (("a", str(bpe)), ("b", str(bpe)), ("bytes", "bytes")):
        prepare(write_jsonl(root / f"{name}.jsonl", docs), root / name, tokenizer=tok, val_every=4)
    return root


def test_vocab_size_defaults_to_the_data_and_an_explicit_one_is_checked(folders):
    path = f"data.path={folders / 'a'}"
    cfg = assemble(job("data=bin", path))
    assert cfg.model.vocab_size == 500
    validate(cfg)
    assert assemble(job("data=bin", path, "model=small")).model.vocab_size == 500  # a preset's 256 does not apply
    assert assemble(job("data=bin", path, "model.vocab_size=512")).model.vocab_size == 512
    with pytest.raises(ValueError, match=rf"data.path={folders / 'a'} holds token ids up to 499 but model.vocab_size=256"):
        validate(assemble(job("data=bin", path, "model.vocab_size=256")))
    # Without data=bin nothing changes: the stdlib corpus and the presets' byte vocabulary.
    assert job().model.vocab_size == 256 and assemble(job()).model.vocab_size == 256
    # submit validates without the data folder: the vocabulary is then left to the job, whose
    # validate names the missing folder.
    elsewhere = assemble(job("data=bin", "data.path=/only/on/the/cluster"))
    assert elsewhere.model.vocab_size is None
    validate(elsewhere, files=False)
    with pytest.raises(ValueError, match="data folder /only/on/the/cluster does not exist"):
        validate(elsewhere)


def test_mixture_from_the_command_line(folders):
    a, b = folders / "a", folders / "b"
    cfg = job("data=bin", f"data.mixture=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]")
    assert [(m.path, m.weight) for m in cfg.data.mixture] == [(str(a), 0.7), (str(b), 0.3)]
    cfg = assemble(cfg)
    assert cfg.model.vocab_size == 500
    validate(cfg)


@pytest.mark.parametrize(
    "mixture,extra,message",
    [
        ("[{path: ONE, weight: 0.7}, {path: TWO, weight: 0}]", [], r"data.mixture\[1\].weight must be a number > 0, got 0"),
        ("[{path: ONE, weight: 1}, {path: BYTES, weight: 1}]", [], r"mixes tokenizers: .*a was prepared with .* but .*bytes with 'bytes'"),
        ("[{path: ONE, weight: 1}, {path: MISSING, weight: 1}]", [], r"data folder .*missing does not exist"),
        ("[{path: ONE, weight: 1}]", ["data.path=ONE"], r"set data.path or data.mixture, not both"),
        ("[{path: ONE, weight: 1}]", ["data=stdlib"], r"data.mixture reads prepared folders: use data=bin"),
    ],
)
def test_mixture_errors(folders, mixture, extra, message):
    names = {"ONE": folders / "a", "TWO": folders / "b", "BYTES": folders / "bytes", "MISSING": folders / "missing"}
    for key, value in names.items():
        mixture = mixture.replace(key, str(value))
        extra = [e.replace(key, str(value)) for e in extra]
    with pytest.raises(ValueError, match=message):
        validate(assemble(job("data=bin", *extra, f"data.mixture={mixture}")))


def test_a_split_too_small_for_one_batch_is_named_before_anything_starts(tmp_path):
    """A val.bin shorter than one global batch of windows failed at the first evaluation, after
    training started, without naming the file (ZeroDivisionError or a sampler's message)."""
    docs = documents(200)
    folder = tmp_path / "small-val"
    prepare(write_jsonl(tmp_path / "d.jsonl", docs), folder, tokenizer="bytes", val_every=199)  # two documents
    path = f"data.path={folder}"
    with pytest.raises(ValueError, match=rf"{folder}/val.bin holds \d+ windows of trainer.seq_len=128 tokens, fewer "
                                         r"than one global batch \(trainer.global_batch_size=64\)"):  # fmt: skip
        validate(assemble(job("data=bin", path, "trainer.global_batch_size=64")))
    validate(assemble(job("data=bin", path, "trainer.global_batch_size=64", "trainer.eval_every=0")))  # never read

    from moe_cluster.train import DataConfig, TrainConfig, Trainer

    cfg = assemble(job("data=bin", path))
    small = TrainConfig(global_batch_size=64, seq_len=128, eval_every=10)
    with pytest.raises(ValueError, match=rf"{folder}/val.bin: the corpus holds"):  # the Trainer, before any step
        Trainer(cfg.model, small, DataConfig(source="bin", path=str(folder)))
