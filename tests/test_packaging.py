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
