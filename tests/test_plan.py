"""The memory planner: published plans, `moe-cluster plan`, the memory refusal, and measured bytes."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_cluster.cli import main
from moe_cluster.config import job_layout, register_configs, validate
from moe_cluster.model import PRESETS, ModelConfig, MoEConfig, num_params, preset
from moe_cluster.plan import GB, Param, check_memory, memory_budget, model_params, plan_job, runs_here, suggestions
from moe_cluster.plan.suggest import _candidates
from tests import plan_measure

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register_configs()


def job(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def mixtral(workers: int, fsdp: bool, *more):
    """Mixtral on `workers` 80 GB GPUs at seq 4096, one sequence per micro-batch, EP over its 8 experts."""
    cfg = job("model=mixtral", "cluster=remote", f"cluster.num_workers={workers}", "parallel.ep=8",
              "trainer.seq_len=4096", f"trainer.global_batch_size={workers}", *more)  # fmt: skip
    cfg.parallel.fsdp = fsdp  # an attribute until parallel.fsdp is a key, then the same as the override
    return cfg


def test_parameter_shapes_add_up_to_the_models_count():
    for name in ("tiny", "small", "mixtral", "deepseek"):
        m = preset(name)
        assert sum(p.numel for p in model_params(m)) == num_params(m, active=False), name


def hand_written_params(m: ModelConfig) -> list[Param]:
    """The planner's former description of ``Transformer(m)``'s tensors, written by hand (frozen
    here: the planner now reads them from the model built on the meta device)."""
    D, Hd, x = m.dim, m.dim // m.n_heads, m.moe
    kv = (m.n_kv_heads or m.n_heads) * Hd
    up = 2 if x.activation == "swiglu" else 1  # SwiGLU's [gate | up] projection is twice as wide
    out = [Param("embed", "root", (m.vocab_size, D)), Param("norm", "root", (D,))]
    if not m.tie_embeddings:
        out.append(Param("head", "root", (m.vocab_size, D)))
    for i in range(m.n_layers):
        b = f"block.{i}"
        out += [Param("attn_norm", b, (D,)), Param("wqkv", b, (D + 2 * kv, D)), Param("wo", b, (D, D)),
                Param("ffn_norm", b, (D,))]  # fmt: skip
        if m.is_moe_layer(i):
            out.append(Param("router", b, (x.num_experts, D)))
            if x.shared_experts:
                Hs = x.shared_experts * x.hidden_dim
                out += [Param("shared.up", b, (up * Hs, D)), Param("shared.down", b, (D, Hs))]
            out += [
                Param("w_up", f"experts.{i}", (x.num_experts, D, up * x.hidden_dim)),
                Param("w_down", f"experts.{i}", (x.num_experts, x.hidden_dim, D)),
            ]
        else:
            out += [Param("up", b, (up * m.dense_hidden_dim, D)), Param("down", b, (D, m.dense_hidden_dim))]
    return out


ARCHITECTURES = {
    **{f"preset {name}": m for name, m in PRESETS.items()},
    **{f"conf/model/{name}.yaml": job(f"model={name}").model for name in ("tiny", "small", "mixtral", "deepseek")},
    "gelu, untied, shared experts, dense blocks between": ModelConfig(
        vocab_size=300, dim=64, n_layers=5, n_heads=4, tie_embeddings=False, moe_every=2, first_dense_layers=1,
        dense_hidden_dim=96, moe=MoEConfig(num_experts=6, top_k=2, hidden_dim=40, activation="gelu", shared_experts=2),
    ),
    "swiglu, grouped-query, sigmoid router with bias, capacity": ModelConfig(
        vocab_size=512, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, moe_every=3,
        moe=MoEConfig(num_experts=4, top_k=1, hidden_dim=48, router="sigmoid", expert_bias=True, capacity_factor=1.5,
                      shared_experts=1),
    ),
    "every block dense": ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, first_dense_layers=2),
}  # fmt: skip


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_parameter_tensors_come_from_the_model_as_described_by_hand(name):
    m = ARCHITECTURES[name]
    assert sorted(model_params(m), key=str) == sorted(hand_written_params(m), key=str)


@pytest.mark.parametrize("workers,fsdp_gb", [(8, 93.4), (16, 46.7), (64, 11.7)])
def test_mixtral_model_state_per_gpu(workers, fsdp_gb):
    # Today's engine holds every dense weight and 1/ep of the experts (ep is at most 8): the same
    # 116 GB per GPU at any size. FSDP shards all of it: 16 bytes x 46.7B parameters / workers.
    plain = plan_job(mixtral(workers, False))
    assert plain.model_state / GB == pytest.approx(115.9, abs=0.1)
    assert not plain.fits
    sharded = plan_job(mixtral(workers, True))
    assert sharded.model_state / GB == pytest.approx(fsdp_gb, abs=0.1)


def test_mixtral_suggestions_name_the_knobs_with_their_figures():
    # 16 GPUs, FSDP off: each knob alone helps but is not enough; FSDP and then checkpointing are.
    cfg = mixtral(16, False)
    fixes = suggestions(cfg, plan_job(cfg))
    assert fixes[0] == "parallel.fsdp=true: 107.9 of 80.0 GB per rank", fixes
    assert not any(f.endswith("(fits)") for f in fixes[:-1])
    assert any(f.startswith("model.activation_checkpointing=full: ") for f in fixes), fixes
    assert fixes[-1] == "together: parallel.fsdp=true model.activation_checkpointing=selective: 60.6 of 80.0 GB per rank (fits)"
    # 8 GPUs: more GPUs as well.
    cfg = mixtral(8, False)
    fixes = suggestions(cfg, plan_job(cfg))
    assert fixes[-1].startswith("together: parallel.fsdp=true") and "cluster.num_workers=16" in fixes[-1], fixes
    assert fixes[-1].endswith("(fits)")


def test_plan_exit_codes_and_json(capsys):
    assert main(["plan", "trainer.seq_len=64"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "--json", "model=mixtral", "cluster.memory_gb_per_worker=12"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert set(out["per_rank_bytes"]) == {"params", "grads", "optimizer", "activations", "transient", "total"}
    assert out["fits"] is False and out["gpu_memory_bytes"] is None and out["host_memory_bytes"] == 12 * GB
    assert out["per_rank_bytes"]["total"] == sum(v for k, v in out["per_rank_bytes"].items() if k != "total")
    # Outside tools read the layout object: these keys, in this order.
    assert list(out["layout"]) == ["world", "ep", "fsdp", "engine", "zero_stage", "gpu", "micro_batch", "seq_len",
                                   "grad_accum", "activation_checkpointing", "load_imbalance"]  # fmt: skip
    assert out["layout"]["world"] == 2 and out["layout"]["engine"] == "native" and out["layout"]["zero_stage"] is None
    assert out["suggestions"]
    assert main(["plan", "--json", "experiment=mixtral_8x", "cluster.num_workers=64", "trainer.global_batch_size=64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["gpu_memory_bytes"] == 80 * GB
    assert main(["plan", "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err


def test_plan_command_exit_status_in_a_shell():
    out = subprocess.run(
        [sys.executable, "-m", "moe_cluster.cli", "plan", "model=mixtral", "cluster.memory_gb_per_worker=24"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "does NOT fit" in out.stdout


def test_mixtral_on_a_laptop_is_refused_at_once():
    cfg = job("model=mixtral", "cluster.memory_gb_per_worker=12")  # a 24 GB laptop, 2 workers
    start = time.monotonic()
    validate(cfg)  # the layout and the files: the memory is the planner's check
    with pytest.raises(ValueError, match=r"does not fit in memory: .* GB per rank, 12.0 GB available") as err:
        check_memory(cfg, here=runs_here(cfg))
    assert time.monotonic() - start < 5 and not ray.is_initialized()
    message = str(err.value)
    assert "params" in message and "activations" in message and "moe-cluster plan" in message
    assert "cluster.num_workers=" in message  # what was tried, with its figure


def test_train_py_refuses_mixtral_before_any_worker_starts():
    # The new user: `python jobs/train.py model=mixtral` on a 24 GB laptop.
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "jobs/train.py", "model=mixtral", "cluster.memory_gb_per_worker=12", "hydra.run.dir=/tmp/plan-test"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert out.returncode == 1
    assert "does not fit in memory" in out.stderr and "resume=true" not in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_check_memory_returns_the_plan_or_refuses():
    cfg = job()
    assert check_memory(cfg, here=True).fits
    unread = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=None))
    assert check_memory(unread, here=True) is None  # the data's vocabulary: planned once assemble reads it
    with pytest.raises(ValueError, match=r"does not fit in memory: .* GB per rank, 12.0 GB available") as err:
        check_memory(job("model=mixtral", "cluster.memory_gb_per_worker=12"), here=False)
    assert "what would change it" in str(err.value) and "moe-cluster plan" in str(err.value)


def test_each_candidate_change_has_its_own_layout():
    cfg = job("model=small", "cluster.num_workers=4", "parallel.ep=2", "trainer.global_batch_size=16")
    candidates = _candidates(cfg)
    for override, changed, layout in candidates:
        assert layout == job_layout(changed), override
    overrides = [override for override, _, _ in candidates]
    # ep=3 does not divide 4 ranks (nor 16 experts): the layout refuses it, so it is not tried.
    assert "parallel.ep=4" in overrides and "parallel.ep=3" not in overrides
    assert "cluster.num_workers=8" in overrides and "cluster.num_workers=32 trainer.global_batch_size=128" in overrides
    assert [o for o in overrides if o.startswith("trainer.grad_accum")] == ["trainer.grad_accum=2", "trainer.grad_accum=4"]
    # DeepSpeed shards with ZeRO: FSDP is not a change its layout takes.
    ds = job("model=small", "trainer.engine=deepspeed", "parallel.fsdp=false")
    assert not [o for o, _, _ in _candidates(ds) if o.startswith("parallel.fsdp")]


def test_small_jobs_still_validate():
    for cfg in (job(), job("experiment=debug"),
                job("model=small", "cluster.num_workers=4", "parallel.ep=4", "trainer.global_batch_size=16")):  # fmt: skip
        validate(cfg)
        assert check_memory(cfg, here=runs_here(cfg)).fits


def test_budget_rules():
    # A CPU job submitted to a cluster from a laptop: no budget known, no refusal.
    cfg = job("model=mixtral", "cluster=remote", "cluster.use_gpu=false")
    assert memory_budget(cfg, None, here=False)[0] is None
    validate(cfg, files=False)
    assert check_memory(cfg, here=False).fits
    # Known resources: two 64 GB nodes of 16 CPUs; PACK puts 8 workers of 4 CPUs 4 to a node.
    resources = {"CPU": 32.0, "memory": 100 * GB, "object_store_memory": 28 * GB, "node:10.0.0.1": 1.0,
                 "node:10.0.0.2": 1.0, "node:__internal_head__": 1.0}  # fmt: skip
    assert memory_budget(cfg, resources, here=False)[0] == 16 * GB
    validate(cfg, resources, files=False)
    with pytest.raises(ValueError, match="does not fit in memory"):
        check_memory(cfg, resources, here=False)
    # GPU workers are planned against cluster.gpu_memory_gb wherever they are checked.
    with pytest.raises(ValueError, match=r"cluster.gpu_memory_gb=80"):
        check_memory(job("experiment=mixtral_8x"), here=False)
    big = job("experiment=mixtral_8x", "cluster.num_workers=64", "trainer.global_batch_size=64")
    validate(big, files=False)
    assert check_memory(big, here=False).fits
    with pytest.raises(ValueError, match=r"cluster.gpu_memory_gb must be > 0"):
        validate(job("cluster.gpu_memory_gb=0"))


# -- planned against measured (CPU) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,world,ep", plan_measure.CASES)
def test_planned_equals_measured(name, world, ep):
    # Each rank's plan is made at the routing it really got (plan_measure.compare).
    for row in plan_measure.compare(name, world, ep, plan_measure.variants(name, world)):
        got, want = row["measured"], row["planned"]
        where = f"{name} world={world} ep={ep} fsdp={row['fsdp']} {row['checkpointing']} rank {row['rank']}"
        for key in ("params", "grads", "optimizer"):
            assert got[key] == pytest.approx(want[key], rel=0.02), f"{where}: {key}"
        assert got["activations"] == pytest.approx(want["activations"], rel=0.20), f"{where}: activations"
        if row["checkpointing"] == "none":  # the other way of measuring agrees
            assert got["saved_tensors"] == pytest.approx(got["activations"], rel=0.01), where
