"""The wheel users get from `pip install .` works on its own: built, installed non-editable into a fresh
environment, and run. (An editable install hides a package left out of pyproject.toml: ftk.evaluation was.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

SUBCOMMANDS = ("pretrain", "finetune", "evaluate", "merge-adapter", "estimate")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """A fresh venv holding only the built ftk wheel; the heavy dependencies come from this environment's
    site-packages through a .pth line (offline and fast), never ftk itself from the source tree."""
    root = tmp_path_factory.mktemp("wheel")
    # A clean copy of the sources: a build/ folder left in the checkout would be reused by setuptools and
    # hide a package that pyproject.toml leaves out.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("ftk-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Lines of a .pth are plain sys.path entries: the dependencies' folder is added, but the .pth files in it
    # (among them this checkout's editable-install finder) are not run.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "ftk"), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def test_the_installed_wheel_imports_ftk_from_itself(installed_wheel, tmp_path):
    where = subprocess.run([str(installed_wheel / "bin" / "python"), "-c", "import ftk; print(ftk.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert str(installed_wheel) in where.stdout and str(REPO) not in where.stdout, where


def test_the_installed_wheel_holds_every_package_of_the_source_tree(installed_wheel, tmp_path):
    """Every folder with an __init__.py (ftk/planner, ftk/regimes, ...) is a package of the wheel: a list in
    pyproject.toml that misses one is found here, whether or not a command happens to import it."""
    folders = {"ftk": REPO / "ftk", "ftk.cli": REPO / "cli", "ftk.recipes": REPO / "recipes",
               "ftk.configs": REPO / "configs"}
    packages = sorted({f"{name}{'.' + '.'.join(init.parent.relative_to(root).parts) if init.parent != root else ''}"
                       for name, root in folders.items() for init in root.rglob("__init__.py")
                       if "__pycache__" not in init.parts})
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([str(installed_wheel / "bin" / "python"), "-c", code, *packages],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "ftk.planner" in packages and done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_of_the_installed_wheel_runs(name, installed_wheel, tmp_path):
    # --help imports the recipe and composes its config from the packaged YAML: a missing subpackage
    # (ModuleNotFoundError) or config file fails here.
    done = _run(installed_wheel, name, "--help", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "== Config ==" in done.stdout or "Powered by Hydra" in done.stdout, done.stdout[-500:]


def test_the_installed_wheel_evaluates_a_model(installed_wheel, pretrained, tmp_path):
    # what failed with ModuleNotFoundError: ftk.evaluation on today's wheel
    run = tmp_path / "eval"
    done = _run(installed_wheel, "evaluate", f"model.name_or_path={pretrained['gpt']}",
                f"data.path={pretrained['corpus']}", "hardware=cpu", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (run / "metrics.json").is_file()
