"""A Ray job on data that `prepare` wrote with a BPE trained in the test: the loss falls, and its
checkpoint samples, evaluates and exports with its tokenizer (the detailed checks: tests/test_infer.py)."""

import json
import math

import pytest
import ray

from moe_cluster.cluster.launch import run_job
from moe_cluster.data import prepare
from moe_cluster.train import DataConfig
from tests.cluster.helpers import losses, small_job
from tests.data.helpers import documents, train_bpe, write_jsonl
from tests.test_infer import greedy_both_ways, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_ray_job_trains_on_prepared_bpe_data_and_its_checkpoint_samples(ray_local, tmp_path, capsys):
    docs = documents(600)
    bpe = train_bpe(tmp_path / "bpe", docs)
    meta = prepare(write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "data", tokenizer=str(bpe),
                   val_fraction=0.05, workers=2)  # fmt: skip
    # One checkpoint, at the end (written by 2 workers at EP=2, FSDP on): what sample, eval and export read.
    job = small_job(tmp_path / "run", max_steps=30, eval_every=30, checkpoint_every=30, recovery="checkpoint")
    job.data = DataConfig(source="bin", path=str(tmp_path / "data"))
    job.model.vocab_size = None  # what data=bin leaves it: the data's vocabulary
    job.model.moe.backend = "torch"  # this test is about the data path, not the kernels
    summary = run_job(job)
    assert summary["steps"] == 30 and summary["failures"] == 0
    loss = losses(tmp_path / "run")
    assert loss[1] == pytest.approx(math.log(meta["vocab_size"]), abs=0.5)  # ~uniform over the 500 BPE tokens
    assert loss[30] < loss[1] - 1.0, loss  # 6.25 -> 4.74 here
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_loss"] < loss[1] - 1.0

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000030"
    # eval scores the run's validation windows in one process: the val_loss logged at step 30.
    code, out, err = run_cli(capsys, "eval", ckpt, "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(last["val_loss"], abs=1e-5)
    code, out, err = run_cli(capsys, "eval", ckpt, "--all", "--device", "cpu")
    assert code == 0 and "every window" in out, err
    # The export carries the tokenizer; greedy decoding equals transformers' on the export.
    code, out, err = run_cli(capsys, "export", ckpt, tmp_path / "hf")
    assert code == 0 and "AutoTokenizer" in out, err
    prompt = "Document 12. The"
    ours, theirs, auto = greedy_both_ways(str(ckpt), tmp_path / "hf", prompt)
    assert ours == theirs
    code, text, err = run_cli(capsys, "sample", ckpt, "--prompt", prompt, "--temperature", "0", "--device", "cpu")
    assert code == 0 and text == prompt + auto.decode([t for t in ours if t != auto.eos_token_id]) + "\n", err
    sampled = [run_cli(capsys, "sample", ckpt, "--prompt", prompt, "--seed", "3", "--device", "cpu") for _ in range(2)]
    assert sampled[0][0] == 0 and sampled[0][1] == sampled[1][1] and sampled[0][1].startswith(prompt)
