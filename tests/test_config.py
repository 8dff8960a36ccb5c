"""conf/ composes against the schemas; validation names the key and the fix."""

import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException

from moe_cluster.config import JobConfig, assemble, compose, deepspeed_user_config, register_configs, validate
from moe_cluster.model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register_configs()


def job(*overrides) -> JobConfig:
    """The job jobs/train.py would run: Hydra's compose, then config.to_job (as the CLI does)."""
    return compose(list(overrides), Path(CONF))


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
        (src / f"f{i}.txt").write_text("text with bytes up to z " * 120 + chr(0x7A) * i)  # a batch per split
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


# -- every field has its range (issue 23) ---------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.moe.top_k=0", "model.moe.top_k must be >= 1, got 0"),
        ("model.moe.top_k=-1", "model.moe.top_k must be >= 1, got -1"),
        ("model.moe.hidden_dim=0", "model.moe.hidden_dim must be >= 1, got 0"),
        ("model.moe.capacity_factor=-1", "model.moe.capacity_factor must be > 0"),
        ("trainer.seq_len=0", "trainer.seq_len must be >= 1, got 0"),
        ("trainer.seq_len=-5", "trainer.seq_len must be >= 1, got -5"),
        ("trainer.global_batch_size=0", "trainer.global_batch_size must be >= 1, got 0"),
        ("trainer.global_batch_size=-2", "trainer.global_batch_size must be >= 1, got -2"),
        ("trainer.eval_every=-1", "trainer.eval_every must be >= 0"),
        ("trainer.optim.lr=-1", "trainer.optim.lr must be finite and > 0"),
        ("trainer.optim.beta2=2", r"trainer.optim.beta2 must be in [0, 1)"),
        ("trainer.optim.grad_clip=-1", "trainer.optim.grad_clip must be >= 0"),
        ("model.norm_eps=-1", "model.norm_eps must be finite and > 0"),
        ("cluster.cpus_per_worker=-1", "cluster.cpus_per_worker must be finite and > 0"),
        ("trainer.eval_batches=0", "trainer.eval_batches must be >= 1"),
        ("model.moe.num_experts=0", "model.moe.num_experts must be >= 1, got 0"),  # was a ZeroDivisionError
        ("trainer.optim.min_lr=0.01", "trainer.optim.min_lr must be between 0 and trainer.optim.lr=0.003"),
        ("trainer.seed=-1", r"trainer.seed must be in [0, 2^32)"),
        ("model.init_std=0", "model.init_std must be finite and > 0"),
        ("model.rope_theta=0", "model.rope_theta must be finite and > 0"),
        ("logger.wandb.mode=cloud", "logger.wandb.mode='cloud' is unknown; use one of: online, offline, disabled"),
        ("data.source=web", "data.source='web' is unknown"),
        # NaN fails every range: each rule states the range (x > 0), never its complement.
        ("trainer.optim.lr=nan", "trainer.optim.lr must be finite and > 0, got nan"),
        ("trainer.optim.beta1=nan", "trainer.optim.beta1 must be in"),
        ("model.norm_eps=nan", "model.norm_eps must be finite and > 0, got nan"),
        ("model.moe.capacity_factor=nan", "model.moe.capacity_factor must be > 0"),
        ("cluster.cpus_per_worker=nan", "cluster.cpus_per_worker must be finite and > 0 (Ray takes fractions: 0.5), got nan"),
        ("trainer.step_timeout_s=nan", "trainer.step_timeout_s must be > 0 and finite, got nan"),
        ("trainer.step_timeout_s=inf", "trainer.step_timeout_s must be > 0 and finite, got inf"),
        ("model.moe.capacity_factor=inf", "model.moe.capacity_factor must be > 0 and finite"),
        ("cluster.gpu_memory_gb=inf", "cluster.gpu_memory_gb must be > 0 and finite"),
        # The keys added for issue 23.
        ("trainer.nan_policy=halt", "trainer.nan_policy='halt' is unknown; use one of: stop, skip"),
        ("trainer.max_nan_skips=0", "trainer.max_nan_skips must be >= 1, got 0"),
        ("trainer.max_nan_skips=-3", "trainer.max_nan_skips must be >= 1, got -3"),
    ],
)
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(job(override), files=False)


def test_new_keys_bad_values():
    with pytest.raises(ValueError, match="trainer.nan_policy=skip needs the native engine"):
        validate(job("trainer.nan_policy=skip", "trainer.engine=deepspeed"), files=False)
    validate(job("trainer.nan_policy=skip", "trainer.max_nan_skips=1"), files=False)
    with pytest.raises(ConfigCompositionException, match="cluster.insecure=maybe"):
        job("cluster.insecure=maybe")  # Hydra types the booleans of a composed job...
    cfg = job()  # ...validate checks those of a job built in Python
    with pytest.raises(ValueError, match="cluster.insecure must be true or false, got 'yes'"):
        validate(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, insecure="yes")))
    with pytest.raises(ValueError, match="resume_with_changes must be true or false, got 1"):
        validate(dataclasses.replace(cfg, resume_with_changes=1))


def _scalar_fields(obj, prefix=""):
    """(full key, field type) of every non-section field of a job (lists and dicts left out)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _scalar_fields(value, f"{prefix}{f.name}.")
        elif not isinstance(value, (list, dict)):
            yield f"{prefix}{f.name}", hints[f.name]


def _bad_value(tp):
    types = set(typing.get_args(tp)) or {tp}
    if bool in types:
        return "yes"
    if float in types:
        return math.nan
    if int in types:
        return -(10**6)
    return None  # a free string (paths, addresses, names): no range


SCALARS = [(key, _bad_value(tp)) for key, tp in _scalar_fields(JobConfig()) if _bad_value(tp) is not None]
CHOICES = ["model.activation_checkpointing", "model.moe.activation", "model.moe.router", "model.moe.backend",
           "trainer.engine", "trainer.recovery", "trainer.nan_policy", "cluster.placement_strategy", "data.source",
           "logger.wandb.mode"]  # fmt: skip


@pytest.fixture(scope="module")
def default_job():
    return job()


@pytest.mark.parametrize("key,bad", SCALARS + [(key, "bogus") for key in CHOICES], ids=lambda v: str(v))
def test_every_field_has_its_range(default_job, key, bad):
    """A guard for fields added later: every number (NaN, -10^6), flag and choice is checked."""
    cfg = copy.deepcopy(default_job)
    *path, name = key.split(".")
    owner = cfg
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, bad)
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}\b"):
        validate(cfg, files=False)


def test_numeric_fields_are_all_covered():
    keys = {key for key, _ in SCALARS}
    assert {"model.moe.top_k", "trainer.optim.beta2", "cluster.cpus_per_worker", "trainer.max_nan_skips",
            "cluster.insecure", "resume_with_changes", "data.max_bytes", "logger.progress_every"} <= keys  # fmt: skip
    assert len(keys) >= 60


@pytest.mark.parametrize(
    "overrides",
    [[], ["model=tiny"], ["model=small"], ["model=mixtral"], ["model=deepseek"], ["experiment=debug"],
     ["experiment=mixtral_8x"], ["trainer.engine=deepspeed"], ["trainer.engine=deepspeed", "deepspeed=zero2"],
     ["logger=wandb"], ["cluster=remote"], ["data=bin"], ["trainer.nan_policy=skip"]],
    ids=lambda o: " ".join(o) or "defaults",
)  # fmt: skip
def test_shipped_configs_pass(overrides):
    validate(job(*overrides), files=False)  # no false refusals


# -- keys the schema lacks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("+trainer.max_stesp=100", "unknown key trainer.max_stesp (did you mean trainer.max_steps?)"),
        ("+model.moe.top_kk=3", "unknown key model.moe.top_kk (did you mean model.moe.top_k?)"),
        ("+trainer.optim.betas2=0.9", "unknown key trainer.optim.betas2 (did you mean trainer.optim.beta2?)"),
        ("+logger.wandb.projet=x", "unknown key logger.wandb.projet (did you mean logger.wandb.project?)"),
        ("+model.seq_len=64", "unknown key model.seq_len (did you mean model.max_seq_len?)"),
        ("+resume_with_change=true", "unknown key resume_with_change (did you mean resume_with_changes?)"),
        ("+no_such_key=1", "unknown key no_such_key. Only deepspeed takes keys"),
    ],
)
def test_plus_keys_the_schema_lacks_are_refused(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        job(override)


def _group_options():
    """(group=option, the section a + key lands in) for every file of every group in conf/."""
    section = {"experiment": "trainer", "deepspeed": None}
    for path in sorted(Path(CONF).glob("*/*.yaml")):
        group = path.parent.name
        yield f"{group}={path.stem}", section.get(group, group)


@pytest.mark.parametrize("choice,section", list(_group_options()))
def test_plus_keys_are_refused_in_every_group(choice, section):
    """Whatever file fills a section (its defaults list merging the schema, a global package as in
    data=bin, an experiment's overrides), a + key the schema lacks is refused there."""
    if section is None:  # deepspeed: free-form, DeepSpeed's own keys
        assert job(choice, "+deepspeed.zero_optimization.offload_param=null").deepspeed is not None
        return
    with pytest.raises(ValueError, match=re.escape(f"unknown key {section}.no_such_key")):
        job(choice, f"+{section}.no_such_key=1")


def test_plus_keys_inside_list_items_are_refused():
    with pytest.raises(ValueError, match=re.escape("unknown key data.mixture[0].wieght (did you mean data.mixture[0].weight?)")):
        job("data=bin", "+data.mixture=[{path: a}]", "+data.mixture.0.wieght=2")
    with pytest.raises(ValueError, match=re.escape("data.mixture[0].path has no default: set it")):
        job("data=bin", "data.mixture=[{weight: 1}]")


def test_train_script_refuses_an_unknown_key_before_ray_starts(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "+trainer.max_stesp=100", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "error: unknown key trainer.max_stesp (did you mean trainer.max_steps?)" in run.stderr
    assert not (tmp_path / "run" / "events.jsonl").exists()
