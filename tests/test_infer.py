"""`sample` and `eval` on checkpoints of runs on prepared data (BPE and bytes), in one process.

The Ray job on prepared data (tests/cluster/test_prepared_data.py) checks the same on a
checkpoint written by two workers; these are the fast, detailed checks.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from moe_cluster.cli import main
from moe_cluster.data import prepare
from moe_cluster.infer import evaluate, load_model, prompt_ids, run_tokenizer
from moe_cluster.model import ModelConfig, MoEConfig
from moe_cluster.model.generate import generate
from moe_cluster.train import DataConfig, OptimConfig, TrainConfig, Trainer
from moe_cluster.train.checkpoint import read_info
from tests.data.helpers import documents, train_bpe, write_jsonl

transformers = pytest.importorskip("transformers")

PROMPT = "Document 7. The quick"


def train_and_save(data: str, vocab_size: int, checkpoint_dir, steps: int = 4) -> tuple[str, Trainer]:
    """A model Mixtral can express, with grouped-query attention, trained a few steps on ``data``."""
    model = ModelConfig(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, tie_embeddings=False,
        moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=24, backend="torch"),
    )  # fmt: skip
    train = TrainConfig(global_batch_size=4, seq_len=32, eval_batches=3, optim=OptimConfig(lr=1e-2, warmup_steps=1))
    trainer = Trainer(model, train, DataConfig(source="bin", path=data), checkpoint_dir=str(checkpoint_dir))
    for _ in range(steps):
        trainer.train_step()
    return str(trainer.save_checkpoint()), trainer


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    docs = documents(120)
    bpe = train_bpe(tmp / "bpe", docs, vocab_size=300)
    meta = prepare(write_jsonl(tmp / "d.jsonl", docs), tmp / "data", tokenizer=str(bpe), val_fraction=0.1)
    ckpt, trainer = train_and_save(str(tmp / "data"), meta["vocab_size"], tmp / "ckpt")
    return {"tmp": tmp, "ckpt": ckpt, "trainer": trainer, "meta": meta, "bpe": bpe}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_checkpoints_carry_the_tokenizer_and_the_eval_settings(bpe_run):
    info = read_info(bpe_run["ckpt"])
    assert info["tokenizer"]["kind"] == "hf" and info["tokenizer"]["sha256"] == bpe_run["meta"]["tokenizer"]["sha256"]
    assert info["tokenizer"]["eos_id"] == bpe_run["meta"]["eos_id"]
    assert (Path(bpe_run["ckpt"]) / "tokenizer.json").read_bytes() == bpe_run["bpe"].read_bytes()
    assert info["trainer"] == {"seq_len": 32, "global_batch_size": 4, "eval_batches": 3, "seed": 0}


def greedy_both_ways(ckpt: str, hf_dir, prompt: str) -> tuple[list[int], list[int], object]:
    """(our greedy tokens, transformers' generate(do_sample=False) on the export, the export's
    AutoTokenizer), after checking that the tokenizer gives the run's ids and end-of-document."""
    model, info = load_model(ckpt)
    tokenizer = run_tokenizer(ckpt, info, model.config.vocab_size)
    ids = prompt_ids(tokenizer, prompt, model.config.max_seq_len, model.config.vocab_size)
    new = model.config.max_seq_len - len(ids)
    ours = generate(model, ids, new, stop_id=tokenizer.stop_id)

    hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert auto(prompt)["input_ids"] == ids  # the export's tokenizer is the run's: no BOS, same ids
    assert auto.eos_token_id == tokenizer.stop_id == hf.config.eos_token_id
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=new)  # fmt: skip
    return ours, out[0, len(ids) :].tolist(), auto


def test_greedy_sample_equals_transformers_generate_on_the_export(bpe_run, capsys):
    ckpt, out = bpe_run["ckpt"], bpe_run["tmp"] / "hf"
    code, _, err = run_cli(capsys, "export", ckpt, out)
    assert code == 0, err
    ours, theirs, auto = greedy_both_ways(ckpt, out, PROMPT)
    assert ours == theirs
    stop = auto.eos_token_id

    # The CLI streams the same text (the prompt, then the continuation, the end-of-document left out).
    code, text, err = run_cli(capsys, "sample", ckpt, "--prompt", PROMPT, "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    assert text == PROMPT + auto.decode([t for t in ours if t != stop]) + "\n"
    assert "new tokens, not 200" in err  # clamped to model.max_seq_len


def test_sample_is_seeded_and_a_too_long_prompt_names_both_lengths(bpe_run, capsys):
    args = ["sample", bpe_run["ckpt"], "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu"]
    first, again = run_cli(capsys, *args, "--num-samples", "2"), run_cli(capsys, *args, "--num-samples", "2")
    assert first[0] == 0 and first[1] == again[1] and first[1].count(PROMPT) == 2
    # One generator for all samples: sample 1 of two is the sample of one.
    assert run_cli(capsys, *args)[1] == first[1].split("-" * 40 + "\n")[0]
    code, _, err = run_cli(capsys, "sample", bpe_run["ckpt"], "--prompt", "lazy dog " * 40, "--device", "cpu")
    assert code == 2 and re.search(r"the prompt is \d{3} tokens, longer than model.max_seq_len=32", err), err


def test_eval_reproduces_the_runs_validation_loss(bpe_run, capsys):
    logged = bpe_run["trainer"].evaluate()  # what the run logs as val_loss at this step
    code, out, err = run_cli(capsys, "eval", bpe_run["ckpt"], "--json", "--device", "cpu")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == {"loss", "perplexity", "tokens"}
    assert r["loss"] == pytest.approx(logged, abs=1e-5) and r["tokens"] == 3 * 4 * 32
    model, info = load_model(bpe_run["ckpt"])
    every = evaluate(model, info, all_windows=True)
    val_tokens = bpe_run["meta"]["tokens"]["val"]
    assert every["tokens"] == (val_tokens - 1) // 32 * 32 and abs(every["loss"] - logged) < 1.0
    code, out, _ = run_cli(capsys, "eval", bpe_run["ckpt"], "--split", "train", "--batches", "2", "--device", "cpu")
    assert code == 0 and "train split: loss" in out and "perplexity" in out


def test_eval_refuses_data_of_another_tokenizer(bpe_run, tmp_path, capsys):
    prepare(write_jsonl(tmp_path / "d.jsonl", documents(20)), tmp_path / "bytes", val_fraction=0.2)
    code, _, err = run_cli(capsys, "eval", bpe_run["ckpt"], "--data", tmp_path / "bytes", "--device", "cpu")
    assert code == 2 and "prepared with tokenizer 'bytes'" in err


def test_a_bytes_run_exports_a_byte_level_tokenizer_and_samples(tmp_path, capsys):
    docs = documents(60)
    meta = prepare(write_jsonl(tmp_path / "d.jsonl", docs), tmp_path / "data", val_fraction=0.1)
    ckpt, _ = train_and_save(str(tmp_path / "data"), meta["vocab_size"], tmp_path / "ckpt", steps=1)
    code, out, err = run_cli(capsys, "export", ckpt, tmp_path / "hf")
    assert code == 0 and "AutoTokenizer" in out, err
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = docs[0]  # with non-ASCII characters
    assert auto(text)["input_ids"] == list(text.encode()) and auto.decode(list(text.encode())) == text
    assert auto.eos_token_id == 256 and json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 256
    code, text, err = run_cli(capsys, "sample", ckpt, "--prompt", "Ünï", "--max-new-tokens", "8", "--device", "cpu")
    assert code == 0 and text.startswith("Ünï"), err


def test_sample_refuses_a_tokenizer_copy_that_is_not_the_saved_one(bpe_run, tmp_path, capsys):
    import shutil

    ckpt = Path(shutil.copytree(bpe_run["ckpt"], tmp_path / "ckpt"))
    other = train_bpe(tmp_path / "other", documents(50, seed=3), vocab_size=300)  # the same size, other merges
    shutil.copyfile(other, ckpt / "tokenizer.json")
    code, _, err = run_cli(capsys, "sample", ckpt, "--prompt", PROMPT, "--max-new-tokens", "2")
    assert code == 2 and "tokenizer.json is not the one saved with it" in err, err
