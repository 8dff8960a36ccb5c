"""Imports point one way, down the layers, and never close a circle: read from every import statement.

tests/layers.py builds the graph (every import anywhere in a file, imports inside functions included;
what it counts is in its docstring). The planted tests below show the checks failing on a fake
project and on a copy of this tree with one bad import added.
"""

import shutil
import textwrap
from pathlib import Path

from tests import layers

ROOT = Path(__file__).resolve().parents[1]

# Layer of each part of the project, low to high: a module may import only parts of a strictly lower
# layer (parts sharing a layer are independent of each other) or its own part. Read from the code as
# it is; a new package or top-level module fails until it is placed here.
LAYERS = {
    # Import nothing of the project: the kernels (installable alone) and the stdlib-only helpers.
    "moe_kernels": 0,
    "moe_cluster.auth": 0,
    "moe_cluster.outdir": 0,
    "moe_cluster.moe": 1,  # router, dispatch, experts, on the kernels
    "moe_cluster.data": 1,  # tokens in: corpora, mixtures, samplers
    "moe_cluster.observe": 1,  # metrics and plots out
    "moe_cluster.model": 2,  # written for one device
    "moe_cluster": 2,  # the package root: re-exports MoELayer (lazily) and __version__
    "moe_cluster.parallel": 3,  # applied to the model from outside
    "moe_cluster.train": 4,  # one rank's loop: model, parallel, data
    "moe_cluster.interop": 5,  # Hugging Face conversion of trained checkpoints
    "moe_cluster.config": 6,  # the job's schema: every section below it
    "moe_cluster.plan": 7,  # memory plan of a validated config
    # Drivers: the Ray controller and workers; generation from a checkpoint.
    "moe_cluster.cluster": 8,
    "moe_cluster.infer": 8,
    # Clients of a running cluster (Ray job submission, the dashboard).
    "moe_cluster.submit": 9,
    "moe_cluster.dashboard": 9,
    "moe_cluster.cli": 10,
    "jobs": 11,  # scripts: import anything
}
# Lower parts a part must still not import (the earlier per-package table's rules): the model and its
# parallelism know nothing of data or logging; the loop logs nothing itself; conversion needs no
# data, logging or parallelism.
FORBIDDEN = {
    "moe_cluster.model": {"moe_cluster.data", "moe_cluster.observe"},
    "moe_cluster.parallel": {"moe_cluster.data", "moe_cluster.observe"},
    "moe_cluster.train": {"moe_cluster.observe"},
    "moe_cluster.interop": {"moe_cluster.data", "moe_cluster.observe", "moe_cluster.parallel"},
}
# Parts that import nothing of the project outside themselves (implied by layer 0, checked on its own).
LEAVES = ("moe_kernels", "moe_cluster.auth", "moe_cluster.outdir")


def _report(found):
    assert not found, f"{len(found)} found:\n" + "\n".join(found)


def test_no_circles():
    _report(layers.circles(layers.build(ROOT)))


def test_imports_point_down_the_layers():
    graph = layers.build(ROOT)
    _report([f"{u}: no module of the tree" for u in graph.unknown] + layers.violations(graph, LAYERS, FORBIDDEN))


def test_leaves_import_nothing_of_the_project():
    graph = layers.build(ROOT)
    assert set(LEAVES) <= {layers.component(m) for m in graph.modules}
    part = layers.component
    leaving = [e for e in graph.edges if part(e.src) in LEAVES and part(e.dst) != part(e.src)]
    _report([str(e) for e in leaving])


# --- the checks fail when they should -------------------------------------------------------------


def _project(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_a_circle_through_imports_in_functions_is_found(tmp_path):
    root = _project(tmp_path, {
        "moe_cluster/__init__.py": "",
        "moe_cluster/a.py": """\
            def f():
                from . import b
            """,
        "moe_cluster/b.py": """\
            import os


            class B:
                def g(self):
                    import moe_cluster.a
            """,
    })
    found = layers.circles(layers.build(root))
    assert found == [
        "moe_cluster.a -> moe_cluster.b -> moe_cluster.a\n"
        "    moe_cluster/a.py:2: moe_cluster.a imports moe_cluster.b\n"
        "    moe_cluster/b.py:6: moe_cluster.b imports moe_cluster.a"
    ]


def test_a_circle_inside_a_package_and_a_longer_one_are_found(tmp_path):
    root = _project(tmp_path, {
        "moe_cluster/__init__.py": "",
        "moe_cluster/train/__init__.py": "from .trainer import Trainer\n",
        "moe_cluster/train/trainer.py": "from .run_info import record\n",
        "moe_cluster/train/run_info.py": "def record():\n    from .trainer import ENGINES\n",
        "moe_cluster/x.py": "from .y import Y\n",
        "moe_cluster/y.py": "try:\n    from moe_cluster.z import Z\nexcept ImportError:\n    Z = None\n",
        "moe_cluster/z.py": "import importlib\nX = importlib.import_module('moe_cluster.x')\n",
    })
    found = layers.circles(layers.build(root))
    assert [f.splitlines()[0] for f in found] == [
        "moe_cluster.train.run_info -> moe_cluster.train.trainer -> moe_cluster.train.run_info",
        "moe_cluster.x -> moe_cluster.y -> moe_cluster.z -> moe_cluster.x",
    ]
    assert "moe_cluster/y.py:2: moe_cluster.y imports moe_cluster.z" in found[1]
    assert "moe_cluster/z.py:2: moe_cluster.z imports moe_cluster.x" in found[1]


def test_type_checking_imports_close_no_circle_but_still_count_for_layers(tmp_path):
    root = _project(tmp_path, {
        "moe_cluster/__init__.py": "",
        "moe_cluster/low.py": "import typing\n\nif typing.TYPE_CHECKING:\n    from .high import High\n",
        "moe_cluster/high.py": "from .low import Low\n",
    })
    graph = layers.build(root)
    assert layers.circles(graph) == []
    assert layers.violations(graph, {"moe_cluster": 0, "moe_cluster.low": 0, "moe_cluster.high": 1}) == [
        "moe_cluster/low.py:4: moe_cluster.low imports moe_cluster.high (TYPE_CHECKING): "
        "moe_cluster.low (layer 0) imports moe_cluster.high (layer 1), a higher layer"
    ]


def test_an_upward_import_in_a_function_and_one_across_a_layer_fail(tmp_path):
    root = _project(tmp_path, {
        "moe_cluster/__init__.py": "",
        "moe_cluster/model/__init__.py": "",
        "moe_cluster/model/config.py": "def f():\n    from ..cluster import Controller\n",
        "moe_cluster/cluster/__init__.py": "from .controller import Controller\n",
        "moe_cluster/cluster/controller.py": "from moe_cluster.model import config\n",
        "moe_cluster/parallel/__init__.py": "",
        "moe_cluster/parallel/fsdp.py": "def f():\n    from moe_cluster.train.step import step\n",
        "moe_cluster/train/__init__.py": "",
        "moe_cluster/train/step.py": "",
        "moe_cluster/parallel/mesh.py": "from ..data import sampler\n",
        "moe_cluster/data/__init__.py": "",
        "moe_cluster/data/sampler.py": "",
    })
    table = {"moe_cluster": 0, "moe_cluster.data": 0, "moe_cluster.model": 1, "moe_cluster.parallel": 2,
             "moe_cluster.train": 2, "moe_cluster.cluster": 3}
    forbidden = {"moe_cluster.parallel": {"moe_cluster.data"}}
    assert layers.violations(layers.build(root), table, forbidden) == [
        "moe_cluster/model/config.py:2: moe_cluster.model.config imports moe_cluster.cluster: "
        "moe_cluster.model (layer 1) imports moe_cluster.cluster (layer 3), a higher layer",
        "moe_cluster/parallel/fsdp.py:2: moe_cluster.parallel.fsdp imports moe_cluster.train.step: "
        "moe_cluster.parallel (layer 2) imports moe_cluster.train (layer 2), the same layer",
        "moe_cluster/parallel/mesh.py:1: moe_cluster.parallel.mesh imports moe_cluster.data.sampler: "
        "moe_cluster.parallel must not import moe_cluster.data, though it is lower (FORBIDDEN)",
    ]


def test_unplaced_parts_kernels_and_scripts(tmp_path):
    root = _project(tmp_path, {
        "moe_cluster/__init__.py": "",
        "moe_cluster/new/__init__.py": "",
        "kernels/__init__.py": "from .ops import route\n",
        "kernels/ops.py": "def route():\n    from moe_cluster import auth\n",
        "moe_cluster/auth.py": "",
        "jobs/bench.py": "import moe_kernels.ops\nfrom moe_cluster.gone import thing\n",
        "jobs/train.py": "from bench import machine\n",
    })
    graph = layers.build(root)
    assert [str(e) for e in graph.edges] == [
        "jobs/bench.py:1: jobs.bench imports moe_kernels.ops",
        "jobs/train.py:1: jobs.train imports jobs.bench",
        "kernels/__init__.py:1: moe_kernels imports moe_kernels.ops",
        "kernels/ops.py:2: moe_kernels.ops imports moe_cluster.auth",
    ]
    assert graph.unknown == ["jobs/bench.py:2: moe_cluster.gone"]
    assert layers.violations(graph, {"moe_kernels": 0, "moe_cluster.auth": 0, "moe_cluster": 1, "jobs": 2}) == [
        "place moe_cluster.new in LAYERS: a part of the tree with no layer",
        "kernels/ops.py:2: moe_kernels.ops imports moe_cluster.auth: "
        "moe_kernels (layer 0) imports moe_cluster.auth (layer 0), the same layer",
    ]


def test_the_real_check_fails_on_a_copy_of_this_tree_with_a_planted_import(tmp_path):
    for folder in ("moe_cluster", "kernels", "jobs"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = layers.build(tmp_path)
    target = tmp_path / "moe_cluster" / "model" / "config.py"
    text = target.read_text()
    target.write_text(text + "\n\ndef _planted():\n    from ..cluster import controller\n")
    line = len(text.splitlines()) + 4
    after = layers.build(tmp_path)
    new = set(layers.violations(after, LAYERS, FORBIDDEN)) - set(layers.violations(before, LAYERS, FORBIDDEN))
    assert new == {
        f"moe_cluster/model/config.py:{line}: moe_cluster.model.config imports moe_cluster.cluster.controller: "
        f"moe_cluster.model (layer 2) imports moe_cluster.cluster (layer 8), a higher layer"
    }
    # cluster.controller imports the model's config (through moe_cluster.config): now a circle too.
    new_circles = [c for c in layers.circles(after) if f"moe_cluster/model/config.py:{line}" in c]
    assert len(new_circles) == 1 and "moe_cluster.cluster.controller" in new_circles[0]
