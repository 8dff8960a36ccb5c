"""conf/ composes against the schemas; validation names the key and the fix."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from moe_cluster.config import JobConfig, assemble, deepspeed_user_config, register_configs, validate
from moe_cluster.model import PRESETS

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def job(*overrides) -> JobConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def test_default_job_and_public_keys():
    cfg = job()
    assert (cfg.model.moe.num_experts, cfg.parallel.ep, cfg.cluster.num_workers) == (8, 2, 2)
    assert cfg.cluster.address is None and cfg.cluster.use_gpu is False
    for key in ("max_steps", "global_batch_size", "seq_len", "checkpoint_every", "max_failures", "seed"):
        assert hasattr(cfg.trainer, key)
    validate(cfg)
    cfg = job("model.moe.num_experts=16", "model.moe.top_k=4", "parallel.ep=4", "cluster.num_workers=8",
              "trainer.global_batch_size=32", "model=small")  # fmt: skip
    assert (cfg.model.dim, cfg.model.moe.num_experts, cfg.model.moe.top_k) == (512, 16, 4)
    validate(cfg)


def test_deepspeed_group_composes():
    cfg = job()
    assert cfg.trainer.engine == "native" and cfg.deepspeed == {"config_path": None}
    cfg = job("trainer.engine=deepspeed", "deepspeed=zero2", "deepspeed.zero_optimization.reduce_bucket_size=1000")
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert deepspeed_user_config(cfg)["zero_optimization"]["reduce_bucket_size"] == 1000
    validate(cfg)
    cfg = job("trainer.engine=deepspeed", "+deepspeed.zero_optimization.stage=2", "+deepspeed.steps_per_print=100")
    assert deepspeed_user_config(cfg) == {"zero_optimization": {"stage": 2}, "steps_per_print": 100}
    validate(cfg)
    # A DeepSpeed setting the native engine does not read is no error there.
    validate(job("+deepspeed.zero_optimization.stage=3"))


def test_deepspeed_json_file_and_section(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 10}, "train_batch_size": 16}))
    cfg = job("trainer.engine=deepspeed", f"deepspeed.config_path={path}", "+deepspeed.zero_optimization.reduce_bucket_size=20")
    assert deepspeed_user_config(cfg) == {"zero_optimization": {"stage": 2, "reduce_bucket_size": 20}, "train_batch_size": 16}
    validate(cfg)
    # `config` is understood too: a JSON path, or a mapping of DeepSpeed keys.
    assert deepspeed_user_config(job("trainer.engine=deepspeed", f"+deepspeed.config={path}"))["train_batch_size"] == 16
    cfg = job("trainer.engine=deepspeed", "+deepspeed.config.zero_optimization.stage=2")
    assert deepspeed_user_config(cfg) == {"zero_optimization": {"stage": 2}}


def test_model_group_files_equal_the_presets():
    for name, preset in PRESETS.items():
        data = yaml.safe_load((Path(CONF) / "model" / f"{name}.yaml").read_text())
        data.pop("defaults")
        assert data == dataclasses.asdict(preset), name


def test_experiment_files_compose():
    for path in (Path(CONF) / "experiment").glob("*.yaml"):
        job(f"experiment={path.stem}")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.moe.num_experts=6", "parallel.ep=4", "cluster.num_workers=4"], r"num_experts=6 is not divisible by parallel.ep=4"),
        (["parallel.ep=4"], r"parallel.ep=4 is larger than cluster.num_workers=2"),
        (["cluster.num_workers=3"], r"cluster.num_workers=3 is not a multiple of parallel.ep=2"),
        (["trainer.global_batch_size=6", "cluster.num_workers=4"], r"global_batch_size=6 is not divisible by cluster.num_workers=4"),
        (["trainer.seq_len=512"], r"trainer.seq_len=512 exceeds model.max_seq_len=256"),
        (["model.moe.top_k=9"], r"top_k=9 exceeds model.moe.num_experts=8"),
        (["cluster.placement_strategy=RANDOM"], r"placement_strategy='RANDOM' is unknown"),
        (["trainer.keep_checkpoints=0"], r"trainer.keep_checkpoints must be >= 1, got 0"),
        (["trainer.grad_accum=0"], r"trainer.grad_accum must be >= 1, got 0"),
        (["trainer.engine=torch"], r"trainer.engine='torch' is unknown; use one of: native, deepspeed"),
        (["trainer.engine=deepspeed", "+deepspeed.train_batch_size=32"],
         r"train_batch_size=32 but trainer.global_batch_size=16"),
        (["trainer.engine=deepspeed", "deepspeed=zero2", "deepspeed.zero_optimization.stage=3"],
         r"stage=3 is refused"),
        (["trainer.engine=deepspeed", "deepspeed.config_path=no/such.json"], r"no/such.json' does not exist"),
        # Values that used to fail only after the actors started:
        (["logger.progress_every=0"], r"logger.progress_every must be >= 1"),
        (["model.moe.activation=relu"], r"model.moe.activation='relu' is unknown; use one of: swiglu, gelu"),
        (["model.moe.backend=cuda"], r"model.moe.backend='cuda' is unknown; use one of: auto, triton, torch"),
        (["model.moe.router=topk"], r"model.moe.router='topk' is unknown"),
        (["data=bin", "data.path=/no/such/folder"], r"data folder /no/such/folder does not exist"),
        (["model.vocab_size=100"], r"byte-level .* model.vocab_size=100"),
    ],
)
def test_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(job(*overrides))


def test_data_folder_is_checked_before_anything_starts(tmp_path):
    from moe_cluster.data import prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.txt").write_text("text with bytes up to z " * 20 + chr(0x7A) * i)
    prepare(src, tmp_path / "data", val_every=2)
    cfg = job("data=bin", f"data.path={tmp_path / 'data'}")
    validate(cfg)
    # data=bin leaves model.vocab_size to the data: bytes and the end-of-document id 256.
    assert cfg.model.vocab_size is None and assemble(cfg).model.vocab_size == 257
    assert job("data=bin", f"data.path={tmp_path / 'data'}", "model=mixtral").model.vocab_size is None
    validate(assemble(job("data=bin", f"data.path={tmp_path / 'data'}", "model.vocab_size=300")))
    with pytest.raises(ValueError, match=r"token ids up to 256 but model.vocab_size=256; set model.vocab_size to at least 257"):
        validate(assemble(job("data=bin", f"data.path={tmp_path / 'data'}", "model.vocab_size=256")))
    (tmp_path / "data" / "val.bin").unlink()
    with pytest.raises(ValueError, match=r"val.bin is missing"):
        validate(job("data=bin", f"data.path={tmp_path / 'data'}"))


def test_cluster_capacity_errors():
    with pytest.raises(ValueError, match=r"needs 8 CPUs but the Ray cluster has 2"):
        validate(job("cluster.num_workers=8", "parallel.ep=2"), {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"needs 2 GPUs .* has 0"):
        validate(job("cluster.use_gpu=true"), {"CPU": 8.0})


def test_hydra_rejects_unknown_keys_and_presets():
    with pytest.raises(MissingConfigException, match="Could not find 'model/huge'"):
        job("model=huge")
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        job("trainer.max_stepz=3")
    with pytest.raises(ConfigCompositionException):
        job("trainer.max_steps=many")


def test_parallel_fsdp_key_and_its_refusal_with_deepspeed():
    assert job().parallel.fsdp is None  # on when the world has more than one rank
    assert job("parallel.fsdp=false").parallel.fsdp is False
    validate(job("parallel.fsdp=true"))
    with pytest.raises(ValueError, match="parallel.fsdp=true shards the native engine"):
        validate(job("parallel.fsdp=true", "trainer.engine=deepspeed"))
    validate(job("trainer.engine=deepspeed"))  # unset: the DeepSpeed engine shards with ZeRO
