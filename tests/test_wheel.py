"""The built wheel holds every package of the tree (onnx_excite/ and its subpackages, cli/ and
models/ as onnx_excite.cli / onnx_excite.models) and the bundled data, and a non-editable
install runs the CLI from any folder."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

#: source folder -> where the wheel installs it
TREES = {"onnx_excite": "onnx_excite", "cli": "onnx_excite/cli", "models": "onnx_excite/models"}


def _package_dirs():
    """Every folder of the three trees that holds Python files, as (source, installed) paths."""
    for src, dst in TREES.items():
        for folder in sorted(p for p in (ROOT / src).rglob("*") if p.is_dir() and "__pycache__" not in p.parts):
            if any(folder.glob("*.py")):
                yield folder, f"{dst}/{folder.relative_to(ROOT / src).as_posix()}"
        yield ROOT / src, dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for tree in TREES:
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    try:   # the build backend of this environment when it has one, else pip's isolated build
        import setuptools  # noqa: F401
        import wheel as _  # noqa: F401
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(src)],
                   check=True, cwd=src, capture_output=True)
    (path,) = out.glob("onnx_excite-*.whl")
    return path


def test_every_package_directory_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dirs = list(_package_dirs())
    assert len(dirs) >= 12
    for folder, installed in dirs:
        assert (folder / "__init__.py").is_file(), f"{folder.relative_to(ROOT)} holds modules but no __init__.py"
        for module in folder.glob("*.py"):
            assert f"{installed}/{module.name}" in names, f"{installed}/{module.name} missing from the wheel"


def test_the_wheel_holds_the_data_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for sample in (ROOT / "onnx_excite" / "data").rglob("*"):
        if sample.is_file():
            assert f"onnx_excite/{sample.relative_to(ROOT / 'onnx_excite').as_posix()}" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "onnx-excite = onnx_excite.cli.app:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_wheel_runs_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the installed copy only: the checkout is not on the path (its dependencies are, from this environment)
    paths = [str(site)] + [p for p in sys.path if p and Path(p).resolve() != ROOT.resolve() and "site-packages" in p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONSAFEPATH": "1"}
    code = ("import onnx_excite, onnx_excite.cli.app, onnx_excite.models.default as d; "
            "print(onnx_excite.__file__); print(d.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert all(line.startswith(str(site)) for line in res.stdout.split()), res.stdout
    res = subprocess.run([sys.executable, "-c", "from onnx_excite.cli.app import main; main()", "methods"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "cmwp" in res.stdout, res.stderr
