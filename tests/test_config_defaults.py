"""One source of defaults, and schemas that load anywhere."""

import dataclasses
import subprocess
import sys

from moe_cluster.config import JobConfig, compose


def _differences(shipped, schema, prefix=""):
    if isinstance(shipped, dict) and isinstance(schema, dict):
        return [d for key in sorted(set(shipped) | set(schema))
                for d in _differences(shipped.get(key), schema.get(key), f"{prefix}{key}.")]  # fmt: skip
    return [] if shipped == schema else [f"{prefix[:-1]}: conf/ {shipped!r}, schema {schema!r}"]


def test_the_shipped_defaults_are_the_schemas():
    # conf/ spells the defaults out for reading; JobConfig() (outside tools, tests, jobs/bench_cluster.py)
    # must be the same job, or the two drift (they did: max_steps 300 against 600).
    shipped = dataclasses.asdict(compose([]))
    assert _differences(shipped, dataclasses.asdict(JobConfig())) == []


def test_the_difference_finder_finds_differences():
    assert _differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c: conf/ 2, schema 3"]


def test_schemas_and_the_layout_load_without_torch_numpy_or_hydra():
    # The driver, `moe-cluster submit|status|...` and outside tools read them (validate imports
    # the kernels' choices, and plan the model: those may need torch).
    code = (
        "import sys; from moe_cluster.config import JobConfig, job_layout; job_layout(JobConfig()); "
        "loaded = [m for m in ('torch', 'numpy', 'hydra') if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
