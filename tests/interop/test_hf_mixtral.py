"""Export to and import from the Hugging Face Mixtral format, checked with transformers itself."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from moe_cluster.cli import main
from moe_cluster.interop.hf_mixtral import (
    SafetensorsDir,
    export_hf_mixtral,
    from_hf_state,
    parse_size,
    plan_shards,
    read_checkpoint,
    resolve_model_config,
)
from moe_cluster.model import Transformer
from moe_cluster.train.launch import launch
from tests.parallel import workers

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory):
    """A checkpoint (EP=1, two steps) of a model Mixtral can express, with AdamW's moments."""
    return workers.train_and_save(workers.mixtral_model(), 1, 2, str(tmp_path_factory.mktemp("mixtral") / "ckpt"))


def our_logits(checkpoint, tokens):
    cfg, state = read_checkpoint(checkpoint)
    model = Transformer(cfg)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(tokens)


def hf_logits(path, tokens):
    model = transformers.MixtralForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tie", [False, True])
def test_export_from_ep2_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, tie):
    cfg = workers.mixtral_model(tie_embeddings=tie)
    # Trained at EP=2 on 2 ranks, the dense state sharded by FSDP (parallel.fsdp defaults on).
    ckpt = launch(2, workers.train_and_save, cfg, 2, 3, str(tmp_path / "ckpt"))[0]
    out = subprocess.run(
        [sys.executable, "-m", "moe_cluster.cli", "export", ckpt, str(tmp_path / "hf"), "--format", "hf-mixtral"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), our_logits(ckpt, tokens), atol=1e-4, rtol=1e-4)


def without_tensors(ckpt: str) -> str:
    """The checkpoint with DCP's files (metadata and shards) deleted: only the commit marker is left."""
    for f in Path(ckpt).iterdir():
        if f.name != "COMMITTED":
            f.unlink()
    return ckpt


def test_features_mixtral_cannot_express_are_named_before_any_tensor_is_read(tmp_path, mixtral_ckpt):
    # The tensors are deleted: the error is still the architecture's, so nothing was read before it.
    ckpt = workers.train_and_save(workers.small_model(), 1, 1, str(tmp_path / "ckpt"))  # has an expert bias
    with pytest.raises(ValueError, match="cannot be written as Mixtral: model.moe.expert_bias=true"):
        export_hf_mixtral(without_tensors(ckpt), tmp_path / "hf")
    cfg = dataclasses.replace(workers.mixtral_model(), moe_every=2)
    ckpt = workers.train_and_save(cfg, 1, 1, str(tmp_path / "ckpt2"))
    with pytest.raises(ValueError, match="dense feed-forward blocks"):
        export_hf_mixtral(without_tensors(ckpt), tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()
    # An expressible checkpoint with its tensors deleted fails on the files instead.
    ckpt = shutil.copytree(mixtral_ckpt, tmp_path / "ckpt3" / Path(mixtral_ckpt).name)
    with pytest.raises(ValueError, match="is unreadable"):
        export_hf_mixtral(without_tensors(str(ckpt)), tmp_path / "hf3")


def test_import_round_trips_exactly_and_trains_at_ep2(tmp_path):
    # A Mixtral-format directory, written by transformers itself.
    hf_cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(hf_cfg).save_pretrained(tmp_path / "src")
    source = load_file(str(tmp_path / "src" / "model.safetensors"))

    # Import, save at step 0, export: the weights come back bit for bit.
    init = workers.mixtral_model(init_from=f"hf:{tmp_path / 'src'}", dim=8, n_layers=1)  # architecture from config.json
    ckpt = workers.train_and_save(init, 1, 0, str(tmp_path / "ckpt0"))
    export_hf_mixtral(ckpt, tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == source.keys()
    for key in source:
        assert torch.equal(back[key], source[key]), key

    # The same at EP=2: each rank reads its own experts only, and together they hold them all.
    ckpt = launch(2, workers.train_and_save, init, 2, 0, str(tmp_path / "ckpt0_ep2"))[0]
    export_hf_mixtral(ckpt, tmp_path / "back_ep2")
    back = load_file(str(tmp_path / "back_ep2" / "model.safetensors"))
    for key in source:
        assert torch.equal(back[key], source[key]), key

    # Import, train one step at EP=2, export, and transformers loads the result.
    ckpt = launch(2, workers.train_and_save, init, 2, 1, str(tmp_path / "ckpt1"))[0]
    export_hf_mixtral(ckpt, tmp_path / "trained")
    tokens = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(hf_logits(tmp_path / "trained", tokens), our_logits(ckpt, tokens), atol=1e-4, rtol=1e-4)
    assert not torch.equal(load_file(str(tmp_path / "trained" / "model.safetensors"))["model.norm.weight"], source["model.norm.weight"])


def test_a_rank_reads_only_its_own_experts(tmp_path):
    hf_cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    transformers.MixtralForCausalLM(hf_cfg).save_pretrained(tmp_path / "src")
    cfg = resolve_model_config(workers.mixtral_model(init_from=f"hf:{tmp_path / 'src'}"))

    class Recording(SafetensorsDir):
        def __init__(self, path):
            super().__init__(path)
            self.read = set()

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

    hf = Recording(tmp_path / "src")
    state = from_hf_state(cfg, hf, experts=range(2, 4))
    experts_read = {int(k.split(".experts.")[1].split(".")[0]) for k in hf.read if ".experts." in k}
    assert experts_read == {2, 3}
    assert state["blocks.0.ffn.experts.w_up"].shape[0] == 2
    full = from_hf_state(cfg, SafetensorsDir(tmp_path / "src"))
    torch.testing.assert_close(state["blocks.1.ffn.experts.w_down"], full["blocks.1.ffn.experts.w_down"][2:4])


def shard_tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted(out.glob("model*.safetensors"))}


def test_sharded_export_loads_in_transformers_like_one_file(tmp_path, mixtral_ckpt):
    export_hf_mixtral(mixtral_ckpt, tmp_path / "one")  # default 5GB: one file, no index
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert written == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    one = load_file(str(tmp_path / "one" / "model.safetensors"))

    limit = 20_000  # the embedding and the LM head (256 x 32 fp32, 32 KB) are larger: a shard each
    export_hf_mixtral(mixtral_ckpt, tmp_path / "sharded", max_shard_size="20KB")
    shards = shard_tensors(tmp_path / "sharded")
    n = len(shards)
    assert n > 2 and sorted(shards) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    for name, tensors in shards.items():
        size = sum(t.nbytes for t in tensors.values())
        assert size <= limit or len(tensors) == 1, (name, size)
    over = [list(tensors) for tensors in shards.values() if sum(t.nbytes for t in tensors.values()) > limit]
    assert over == [["model.embed_tokens.weight"], ["lm_head.weight"]]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {key: name for name, tensors in shards.items() for key in tensors}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in one.values())
    together = {key: t for tensors in shards.values() for key, t in tensors.items()}
    assert together.keys() == one.keys() and all(torch.equal(together[k], one[k]) for k in one)

    tokens = torch.randint(0, 256, (2, 16))
    assert torch.equal(hf_logits(tmp_path / "sharded", tokens), hf_logits(tmp_path / "one", tokens))

    # Exporting again into the same folder is refused, and with overwrite leaves none of the earlier files behind.
    with pytest.raises(ValueError, match="sharded is not empty"):
        export_hf_mixtral(mixtral_ckpt, tmp_path / "sharded")
    export_hf_mixtral(mixtral_ckpt, tmp_path / "sharded", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == written


def test_bf16_export_is_the_fp32_export_rounded(tmp_path, mixtral_ckpt):
    export_hf_mixtral(mixtral_ckpt, tmp_path / "fp32")
    export_hf_mixtral(mixtral_ckpt, tmp_path / "bf16", max_shard_size="30KB", dtype="bf16")
    fp32 = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    bf16 = {k: t for tensors in shard_tensors(tmp_path / "bf16").values() for k, t in tensors.items()}
    assert bf16.keys() == fp32.keys()
    for key in fp32:
        assert bf16[key].dtype == torch.bfloat16 and torch.equal(bf16[key], fp32[key].to(torch.bfloat16)), key
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in fp32.values()) // 2


def test_export_reads_model_tensors_only(tmp_path, mixtral_ckpt, monkeypatch):
    requested = []
    read_data = dcp.FileSystemReader.read_data

    def spy(self, plan, planner):
        requested.extend(item.storage_index.fqn for item in plan.items)
        return read_data(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemReader, "read_data", spy)
    export_hf_mixtral(mixtral_ckpt, tmp_path / "hf", max_shard_size="20KB")
    stored = dcp.FileSystemReader(mixtral_ckpt).read_metadata().state_dict_metadata
    assert any(k.startswith("optim.") for k in stored)
    assert requested and set(requested) == {k for k in stored if k.startswith("model.")}
    requested.clear()
    read_checkpoint(mixtral_ckpt)
    assert requested and not [k for k in requested if not k.startswith("model.")]


def test_shard_sizes_and_plans_follow_transformers():
    assert [parse_size(s) for s in ("5GB", "500MB", "100KB", "1.5GB", "2GiB", "1mb", 123, "123")] == [
        5 * 10**9, 500 * 10**6, 100_000, 1_500_000_000, 2 * 2**30, 10**6, 123, 123,
    ]  # fmt: skip
    for bad in ("", "GB", "5XB", "0", "-1MB", "five"):
        with pytest.raises(ValueError, match="not understood"):
            parse_size(bad)
    # A tensor over the limit gets a shard of its own; the others are packed in order.
    assert plan_shards([("a", 3), ("b", 3), ("big", 10), ("c", 4), ("d", 1)], 6) == [["big"], ["a", "b"], ["c", "d"]]


def test_cli_export_with_shard_size_and_dtype(tmp_path, mixtral_ckpt, capsys):
    assert main(["export", mixtral_ckpt, str(tmp_path / "hf"), "--max-shard-size", "1MB", "--dtype", "bf16"]) == 0
    assert "bf16" in capsys.readouterr().out
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))  # the whole model is under 1MB: one file
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(SystemExit) as exc:
        main(["export", mixtral_ckpt, str(tmp_path / "bad"), "--max-shard-size", "5 lots"])
    assert exc.value.code == 2
    assert "--max-shard-size: max shard size '5 lots' is not understood" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def contents(folder: Path) -> dict[str, bytes | str]:
    """Every path under ``folder`` and its bytes ("dir" for a folder, the target for a symlink)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = f"-> {p.readlink()}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def test_export_never_writes_into_over_or_around_the_checkpoint(tmp_path, mixtral_ckpt, capsys):
    ckpt = Path(shutil.copytree(mixtral_ckpt, tmp_path / "run" / "step_1"))  # a copy: the fixture stays whole
    before = contents(ckpt)
    assert "tokenizer.json" in before
    (tmp_path / "link").symlink_to(ckpt)
    for out, extra, message in [
        (ckpt, [], "output folder .*step_1 is the checkpoint itself; choose another output folder"),
        (tmp_path / "link", ["--overwrite"], "is the checkpoint itself"),
        (ckpt / "hf", [], "output folder .*step_1/hf is inside the checkpoint .*step_1; choose a folder outside it"),
        (tmp_path / "run", ["--overwrite"],
         r"output folder .*run holds the checkpoint .*step_1 \(--overwrite would delete it\); choose a folder that"),
    ]:  # fmt: skip
        assert main(["export", str(ckpt), str(out), *extra]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("moe-cluster export: error: output folder") and re.search(message, err), err
    assert contents(ckpt) == before  # tokenizer.json included


def another_models_folder(tmp_path: Path) -> Path:
    """A folder another model's export left: its eos (2) is not the run's, plus links to files outside it."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (other / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (other / "tokenizer.model").write_bytes(b"\x00sentencepiece model of another vocabulary")
    (other / "model-00001-of-00002.safetensors").write_bytes(b"not ours")
    (other / "sub" / "deep").mkdir(parents=True)
    (other / "sub" / "deep" / "notes.txt").write_text("x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("kept")
    (other / "link-to-file").symlink_to(tmp_path / "outside" / "keep.txt")
    (other / "link-to-folder").symlink_to(tmp_path / "outside")
    (other / "sub" / "link-to-folder").symlink_to(tmp_path / "outside")
    return other


def test_export_into_another_models_folder_needs_overwrite_then_holds_its_files_only(tmp_path, mixtral_ckpt, capsys):
    other = another_models_folder(tmp_path)
    before = contents(other)
    assert main(["export", mixtral_ckpt, str(other)]) == 2
    err = capsys.readouterr().err
    assert "moe-cluster export: error: output folder" in err and "other is not empty (generation_config.json" in err
    assert "pass --overwrite to replace its contents, or choose an empty folder" in err
    assert contents(other) == before

    assert main(["export", mixtral_ckpt, str(other), "--overwrite"]) == 0
    written = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in other.iterdir()) == written
    assert contents(tmp_path / "outside") == {"keep.txt": b"kept"}  # the links went, not their targets
    eos = json.loads((other / "config.json").read_text())["eos_token_id"]  # None: stdlib data has no end-of-document
    assert eos != 2
    assert transformers.AutoConfig.from_pretrained(other).eos_token_id == eos
    assert transformers.AutoTokenizer.from_pretrained(other).eos_token_id == eos
    model = transformers.MixtralForCausalLM.from_pretrained(other, local_files_only=True)
    assert model.generation_config.eos_token_id == eos  # no stale generation_config.json read


def test_a_refused_overwrite_export_removes_nothing(tmp_path, mixtral_ckpt, capsys):
    other = another_models_folder(tmp_path)
    before = contents(other)
    biased = workers.train_and_save(workers.small_model(), 1, 0, str(tmp_path / "biased"))  # has an expert bias
    unreadable = without_tensors(str(shutil.copytree(mixtral_ckpt, tmp_path / "gone" / Path(mixtral_ckpt).name)))
    for ckpt, message in [(biased, "cannot be written as Mixtral: model.moe.expert_bias=true"),
                          (unreadable, "is unreadable")]:  # fmt: skip
        assert main(["export", ckpt, str(other), "--overwrite"]) == 2
        assert message in capsys.readouterr().err
        assert contents(other) == before
