"""Install the lowest versions pyproject.toml allows and run the tests that exercise what needs them.

    python scripts/check_floors.py                 # venv in /tmp/ftk-floors, then the tests below
    python scripts/check_floors.py --dry-run       # print the pins only
    FTK_TORCH_INDEX=https://download.pytorch.org/whl/cpu python scripts/check_floors.py   # torch's CPU build

Every `name>=X` requirement (and the `quant`/`test` extras) is installed as `name==X`, in a fresh virtualenv,
then ftk itself without dependencies, then pytest runs FLOOR_TESTS there. Slow (downloads torch and
rebuilds the tiny models): run it by hand, or in a CI job of its own, whenever a floor or an API use changes.
Ends with `floors: passed` or `floors: failed` (exit code 1).

Checked so far (2026-12, this machine): the pins resolve together (`pip install --dry-run` of them: an earlier
tokenizers>=0.21 and safetensors>=0.4 could not be installed with transformers 5.0). The test run itself has
not been done: it needs torch 2.6 downloaded, which this machine's PyPI access does not give as a CPU build.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
# The tests over the version-sensitive paths: FSDP2 and DDP on gloo, torch.compile, QLoRA, the GradScaler.
FLOOR_TESTS = ["tests/test_distributed.py", "tests/test_ddp_regimes.py", "tests/test_compile.py",
               "tests/test_fp16_skip.py", "tests/test_qlora_cpu.py", "tests/test_device_placement.py",
               "tests/test_precision_choice.py", "tests/test_gpu_check.py"]


def floor_pins(pyproject: Path = REPO / "pyproject.toml", extras=("quant", "test")) -> List[str]:
    """`name==lowest` for every requirement with a `>=` lower bound (others are left as written)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    pins = []
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$", requirement)
        name, spec = match.group(1), match.group(2)
        low = re.search(r">=\s*([0-9][^,\s]*)", spec)
        pins.append(f"{name}=={low.group(1)}" if low else requirement)
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", default="/tmp/ftk-floors")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    pins = floor_pins()
    print("\n".join(pins))
    if args.dry_run:
        return 0
    venv = Path(args.venv)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    torch = [p for p in pins if p.startswith("torch==")]
    index = os.environ.get("FTK_TORCH_INDEX")
    subprocess.run([python, "-m", "pip", "install", "-q", *torch, *(["--index-url", index] if index else [])],
                   check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *[p for p in pins if not p.startswith("torch==")]],
                   check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True)
    done = subprocess.run([python, "-m", "pytest", "-q", *FLOOR_TESTS], cwd=REPO)
    print(f"floors: {'passed' if done.returncode == 0 else 'failed'}")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
