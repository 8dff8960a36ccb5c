"""trainer.engine=deepspeed: ZeRO 1 and 2 on gloo ranks against the native engine, its
checkpoints in both directions, and the config conflicts caught before any worker starts."""

import json

import pytest
import ray
import torch

from moe_cluster.cluster.launch import run_job
from moe_cluster.parallel import Layout
from moe_cluster.train import OptimConfig, Trainer
from moe_cluster.train.ds_config import load_user_config, resolve_config, user_config
from moe_cluster.train.launch import launch
from tests.cluster.helpers import small_job
from tests.parallel.workers import DATA, engine_run, in_turn, small_model, train_config

OURS = dict(layout=Layout(2, 1, 2, num_experts=4, global_batch_size=16), optim=OptimConfig(grad_clip=0.5))


def test_resolve_config_fills_our_keys_and_keeps_theirs():
    ds = resolve_config({"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": False}, **OURS)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"overlap_comm": True, "stage": 1} and ds["wall_clock_breakdown"] is False
    # "auto", agreeing values, and an optimizer section that says what trainer.optim says are accepted.
    o = OptimConfig(grad_clip=0.5)
    same = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                  "weight_decay": o.weight_decay}},
    }  # fmt: skip
    ds = resolve_config(same, **OURS)
    assert ds["zero_optimization"]["stage"] == 2 and "optimizer" not in ds
    # The Hugging Face style: everything ours is "auto".
    hf = {
        "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}},
    }  # fmt: skip
    ds = resolve_config(hf, **OURS)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert not {"fp16", "bf16", "optimizer", "scheduler"} & ds.keys()


def test_hydra_config_objects_are_taken_as_plain_dicts():
    from omegaconf import OmegaConf

    section = OmegaConf.create({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}})
    ds = resolve_config(load_user_config(None, section), **OURS)
    assert ds["zero_optimization"]["stage"] == 2 and type(ds["zero_optimization"]) is dict


def test_user_config_file_with_overrides(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "steps_per_print": 5}))
    merged = load_user_config(str(path), {"zero_optimization": {"reduce_bucket_size": 2000}})
    assert merged == {"zero_optimization": {"stage": 2, "reduce_bucket_size": 2000}, "steps_per_print": 5}
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ValueError, match="bad.json' is not valid JSON"):
        load_user_config(str(tmp_path / "bad.json"), None)
    with pytest.raises(ValueError, match="missing.json' does not exist"):
        load_user_config(str(tmp_path / "missing.json"), None)
    # The section form: DeepSpeed keys beside config_path (or a `config` path or mapping).
    assert user_config({"config_path": str(path), "steps_per_print": 7})["steps_per_print"] == 7
    assert user_config({"config": str(path)})["zero_optimization"]["reduce_bucket_size"] == 1000
    with pytest.raises(ValueError, match="name two JSON files; give one"):
        user_config({"config_path": str(path), "config": "other.json"})


@pytest.mark.parametrize(
    "user,message",
    [
        ({"train_batch_size": 32}, r"train_batch_size=32 but trainer.global_batch_size=16"),
        ({"train_micro_batch_size_per_gpu": 8}, r"train_micro_batch_size_per_gpu=8 but trainer.global_batch_size"),
        ({"gradient_accumulation_steps": 1}, r"gradient_accumulation_steps=1 but trainer.grad_accum=2"),
        ({"gradient_clipping": 1.0}, r"gradient_clipping=1.0 but trainer.optim.grad_clip=0.5"),
        ({"zero_optimization": {"stage": 3}}, r"stage=3 is refused: DeepSpeed does not support its MoE"),
        ({"zero_optimization": {"stage": 0}}, r"stage=0 is not supported .* use 1 or 2"),
        ({"fp16": {"enabled": True}}, r"fp16.enabled=true .* not supported"),
        ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler' section, but the learning-rate schedule is trainer.optim"),
        ({"optimizer": {"type": "SGD"}}, r"optimizer.type='SGD' is not supported"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, r"remove 'scheduler'"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
         r"zero_optimization.offload_optimizer .* is not supported"),
        ({"zero_optimization": {"stage": 1, "cpu_offload": True}}, r"zero_optimization.offload_optimizer .* not supported"),
        ({"zero_optimization": {"stage": 2, "overlap_comms": True}}, r"zero_optimization is invalid: zero_optimization.overlap_comms: Extra inputs are not permitted"),
        ({"optimizer": {"type": "AdamW", "params": [0.1]}}, r"optimizer.params .* must be an object"),
        ({"optimizer": "AdamW"}, r"optimizer in the DeepSpeed config must be an object"),
        ({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}, r"optimizer.params.lr=0.1 but trainer.optim.lr"),
        ({"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}}, r"adam_w_mode=false asks for Adam"),
        ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, r"keys the engine does not take: \['amsgrad'\]"),
    ],
)
def test_conflicting_configs_are_refused(user, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(user, **OURS)


def test_engine_needs_a_process_group():
    with pytest.raises(ValueError, match="trainer.engine=deepspeed needs a torch.distributed process group"):
        Trainer(small_model(), train_config(engine="deepspeed"), DATA)


def test_conflict_stops_the_job_before_ray_starts(tmp_path):
    job = small_job(tmp_path)
    job.trainer.engine = "deepspeed"
    job.deepspeed = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="stage=3 is refused"):
        run_job(job)
    job.deepspeed = {"train_batch_size": 4}
    with pytest.raises(ValueError, match="train_batch_size=4 but trainer.global_batch_size=8"):
        run_job(job)
    assert not ray.is_initialized() and not (tmp_path / "checkpoints").exists()


def _assert_same_run(a: dict, b: dict, rtol: float = 1e-5):
    assert a["loss"] == pytest.approx(b["loss"], rel=rtol)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rtol)
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        torch.testing.assert_close(a["params"][name], b["params"][name], rtol=rtol, atol=1e-6, msg=name)
    for x, y in zip(a["expert_bias"], b["expert_bias"]):
        torch.testing.assert_close(x, y)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,ep,stage,grad_accum",
    [(2, 1, 2, 1), (2, 2, 1, 2), (2, 2, 2, 2), (4, 2, 2, 1)],
    ids=["ep1-zero2", "ep2-zero1-accum2", "ep2-zero2-accum2", "4ranks-ep2-zero2"],
)
def test_deepspeed_engine_matches_native(world, ep, stage, grad_accum):
    # The 4-rank case has both an EP group and an expert-data-parallel group of two ranks, so
    # DeepSpeed must reduce (and ZeRO-2 partition) expert gradients over exactly our groups.
    ds = {"zero_optimization": {"stage": stage}}
    native, deep = zip(*launch(world, in_turn, [
        (engine_run, "native", ep, 4, None, None, None, False, grad_accum),
        (engine_run, "deepspeed", ep, 4, ds, None, None, False, grad_accum),
    ]))  # fmt: skip
    for rank in range(world):
        _assert_same_run(deep[rank], native[rank])
    assert native[0]["loss"][-1] < native[0]["loss"][0]


@pytest.mark.slow
def test_deepspeed_checkpoints_resume_and_cross_engines(tmp_path):
    ds = {"zero_optimization": {"stage": 2}}
    d, n = str(tmp_path), str(tmp_path / "native")
    full, resumed, native, ep1, _, from_native = launch(2, in_turn, [
        (engine_run, "deepspeed", 2, 4, ds, d, 2),
        (engine_run, "deepspeed", 2, 2, ds, d, None, True),
        (engine_run, "native", 2, 2, None, d, None, True),  # the same checkpoint on the native engine
        (engine_run, "deepspeed", 1, 2, ds, d, None, True),  # and resharded to EP=1 on DeepSpeed
        (engine_run, "native", 2, 2, None, n, 2),
        (engine_run, "deepspeed", 2, 2, ds, n, None, True),  # the other way: a native checkpoint
    ])[0]  # fmt: skip
    # The second loss after resuming depends on the AdamW state that came back into the ZeRO
    # partitions; all of it comes back exactly.
    assert resumed["loss"] == full["loss"][2:] and resumed["grad_norm"] == full["grad_norm"][2:]
    for name, p in full["params"].items():
        assert torch.equal(resumed["params"][name], p), name
    assert native["loss"] == pytest.approx(full["loss"][2:], rel=1e-5)
    assert ep1["loss"] == pytest.approx(full["loss"][2:], rel=1e-5)
    assert from_native["loss"] == pytest.approx(full["loss"][2:], rel=1e-5)
