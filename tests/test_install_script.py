"""scripts/install.sh picks torch's CUDA build wherever GPU jobs will run, the CPU build elsewhere (issue 16)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _choice(tmp_path, tools=(), **env):
    """The build install.sh would install with only `tools` (fake executables) on PATH beside the basics."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"
    done = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--torch-build"], capture_output=True,
                          text=True, env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env}, timeout=60)
    return done


@pytest.mark.parametrize("tools, expected", [
    ((), "cpu"),                       # a laptop or this CI machine
    (("nvidia-smi",), "cuda"),         # a GPU node
    (("sbatch",), "cuda"),             # a SLURM login node: no GPU here, but the jobs run on GPU nodes
    (("qsub",), "cuda"),
])
def test_torch_build_follows_where_jobs_run(tmp_path, tools, expected):
    done = _choice(tmp_path, tools)
    assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr


def test_torch_build_setting_overrides_and_is_checked(tmp_path):
    assert _choice(tmp_path, ("sbatch",), FTK_TORCH_BUILD="cpu").stdout.strip() == "cpu"
    bad = _choice(tmp_path, FTK_TORCH_BUILD="rocm7")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "FTK_TORCH_BUILD=cpu" in bad.stderr
