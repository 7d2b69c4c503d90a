"""The version floors in pyproject.toml can be installed together (pip resolves them without downloading
torch): an inconsistent floor, like tokenizers>=0.21 under transformers>=5.0, fails here. The full check,
installing the floors and running the tests, is scripts/check_floors.py (too slow for every test run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _floor_pins():
    spec = importlib.util.spec_from_file_location("check_floors", REPO / "scripts" / "check_floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.floor_pins()


def test_floors_are_pinned_for_the_fsdp2_code():
    pins = dict(p.split("==") for p in _floor_pins() if "==" in p)
    assert tuple(map(int, pins["torch"].split(".")[:2])) >= (2, 6)       # torch.distributed.fsdp.fully_shard
    assert tuple(map(int, pins["accelerate"].split(".")[:2])) >= (1, 6)  # FSDP2 plugin, keep_torch_compile


@pytest.mark.skipif(not os.environ.get("FTK_CHECK_FLOORS_ONLINE"), reason="asks PyPI; set FTK_CHECK_FLOORS_ONLINE=1")
def test_floors_resolve_together():
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           *_floor_pins()], capture_output=True, text=True, timeout=600)
    assert "ResolutionImpossible" not in done.stderr, done.stderr[-2000:]
