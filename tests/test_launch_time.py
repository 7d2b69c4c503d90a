"""All ranks of a torchrun launch name the same timestamped run folder (issue 16, finding 10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_distributed import free_port

REPO = Path(__file__).resolve().parents[1]

# Each rank composes `ftk pretrain`'s real config and prints the run folder Hydra would create; rank 1 starts
# 1.5 s late, so with each process's own clock the two folders would differ by a second or two.
SCRIPT = """
import os, sys, time
time.sleep(1.5 * int(os.environ["RANK"]))
from hydra import compose, initialize_config_dir
from ftk import schemas
schemas.register()
with initialize_config_dir(config_dir=sys.argv[1], version_base=None):
    cfg = compose("pretrain", return_hydra_config=True)
print("RUN_DIR", cfg.hydra.run.dir, flush=True)
"""


def test_torchrun_ranks_share_one_timestamped_run_folder(tmp_path):
    script = tmp_path / "compose.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "--tee", "3", str(script), str(REPO / "configs")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    folders = {line.split("RUN_DIR", 1)[1].strip() for line in done.stdout.splitlines() if "RUN_DIR" in line}
    assert len(folders) == 1 and next(iter(folders)).startswith("runs/pretrain/"), done.stdout


def test_outside_torchrun_each_command_reads_the_clock(monkeypatch):
    from ftk import launch_time

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    first = launch_time.started()
    assert launch_time.started() >= first and launch_time._AGREED is None
