"""The distribution lists every package, installs the kernels as moe_kernels, and has its CLI."""

import pathlib
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "moe_cluster").rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert config["package-dir"]["moe_kernels"] == "kernels"


def test_kernels_never_import_moe_cluster():
    for path in (ROOT / "kernels").glob("*.py"):
        assert "moe_cluster" not in path.read_text().replace("never imports ``moe_cluster``", ""), path


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "moe_cluster.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("moe-cluster ")


def test_job_commands_load_without_torch():
    # status / logs / list / stop talk to the Ray dashboard: importing torch (over a second) is not needed.
    code = "import sys, moe_cluster.cli, moe_cluster; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_prepare(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("some text " * 20)
    (tmp_path / "src" / "b.txt").write_text("more text " * 20)  # one file each for validation and training
    out = subprocess.run(  # OUT beside SRC: one inside it is refused (it would be read as input)
        [sys.executable, "-m", "moe_cluster.cli", "prepare", str(tmp_path / "src"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "train.bin").is_file() and (tmp_path / "out" / "meta.json").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "moe_cluster.cli", "prepare", str(tmp_path / "nothing"), str(tmp_path / "o2")],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "no files under" in bad.stderr


# Each package of moe_cluster and the packages it may import from (the rest of the tree is above it).
LAYERS = {
    "moe": set(),
    "model": {"moe"},
    "parallel": {"moe", "model"},
    "data": set(),
    "train": {"moe", "model", "parallel", "data"},
    "interop": {"moe", "model", "train"},
    "observe": set(),
}
# Standard-library-only modules at the top of moe_cluster, which any package may import.
LEAVES = {"outdir", "auth"}


def test_dependencies_point_one_way():
    import ast

    for package, allowed in LAYERS.items():
        for path in (ROOT / "moe_cluster" / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                    target = node.module.split(".")[0]
                    assert target in allowed | LEAVES, f"{path.relative_to(ROOT)} imports moe_cluster.{target}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    for name in names:
                        if name.startswith("moe_cluster."):
                            assert name.split(".")[1] in allowed | LEAVES, f"{path.relative_to(ROOT)} imports {name}"
    for leaf in LEAVES:
        for node in ast.walk(ast.parse((ROOT / "moe_cluster" / f"{leaf}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level == 0 and not module.startswith("moe_cluster"), f"{leaf}.py imports {module}"
            if isinstance(node, ast.Import):
                assert not [a for a in node.names if a.name.startswith("moe_cluster")], f"{leaf}.py imports moe_cluster"
