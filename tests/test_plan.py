"""The memory planner: published plans, `moe-cluster plan`, validate's refusal, and measured bytes."""

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
from moe_cluster.config import register_configs, validate
from moe_cluster.model import num_params, preset
from moe_cluster.plan import GB, memory_budget, model_params, plan_job, suggestions
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


def test_validate_refuses_mixtral_on_a_laptop_at_once():
    cfg = job("model=mixtral", "cluster.memory_gb_per_worker=12")  # a 24 GB laptop, 2 workers
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"does not fit in memory: .* GB per rank, 12.0 GB available") as err:
        validate(cfg)
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


def test_small_jobs_still_validate():
    validate(job())
    validate(job("experiment=debug"))
    validate(job("model=small", "cluster.num_workers=4", "parallel.ep=4", "trainer.global_batch_size=16"))


def test_budget_rules():
    # A CPU job submitted to a cluster from a laptop: no budget known, no refusal.
    cfg = job("model=mixtral", "cluster=remote", "cluster.use_gpu=false")
    assert memory_budget(cfg, None, here=False)[0] is None
    validate(cfg, files=False)
    # Known resources: two 64 GB nodes of 16 CPUs; PACK puts 8 workers of 4 CPUs 4 to a node.
    resources = {"CPU": 32.0, "memory": 100 * GB, "object_store_memory": 28 * GB, "node:10.0.0.1": 1.0,
                 "node:10.0.0.2": 1.0, "node:__internal_head__": 1.0}  # fmt: skip
    assert memory_budget(cfg, resources, here=False)[0] == 16 * GB
    with pytest.raises(ValueError, match="does not fit in memory"):
        validate(cfg, resources, files=False)
    # GPU workers are planned against cluster.gpu_memory_gb wherever they are checked.
    with pytest.raises(ValueError, match=r"cluster.gpu_memory_gb=80"):
        validate(job("experiment=mixtral_8x"), files=False)
    validate(job("experiment=mixtral_8x", "cluster.num_workers=64", "trainer.global_batch_size=64"), files=False)
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
