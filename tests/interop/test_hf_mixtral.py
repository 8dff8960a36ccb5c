"""Export to and import from the Hugging Face Mixtral format, checked with transformers itself."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_cluster.interop.hf_mixtral import (
    SafetensorsDir,
    export_hf_mixtral,
    from_hf_state,
    read_checkpoint,
    resolve_model_config,
)
from moe_cluster.model import Transformer
from moe_cluster.train.launch import launch
from tests.parallel import workers

transformers = pytest.importorskip("transformers")


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
    ckpt = launch(2, workers.train_and_save, cfg, 2, 3, str(tmp_path / "ckpt"))[0]  # trained at EP=2
    out = subprocess.run(
        [sys.executable, "-m", "moe_cluster.cli", "export", ckpt, str(tmp_path / "hf"), "--format", "hf-mixtral"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), our_logits(ckpt, tokens), atol=1e-4, rtol=1e-4)


def test_features_mixtral_cannot_express_are_named(tmp_path):
    ckpt = workers.train_and_save(workers.small_model(), 1, 1, str(tmp_path / "ckpt"))  # has an expert bias
    with pytest.raises(ValueError, match="cannot be written as Mixtral: model.moe.expert_bias=true"):
        export_hf_mixtral(ckpt, tmp_path / "hf")
    cfg = dataclasses.replace(workers.mixtral_model(), moe_every=2)
    ckpt = workers.train_and_save(cfg, 1, 1, str(tmp_path / "ckpt2"))
    with pytest.raises(ValueError, match="dense feed-forward blocks"):
        export_hf_mixtral(ckpt, tmp_path / "hf2")


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
