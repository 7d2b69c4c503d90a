"""scripts/slurm/ftk-pretrain.sbatch, run for real on this machine: `srun` and `scontrol` are stand-ins (srun
runs its command, scontrol records a requeue), torchrun starts 2 gloo workers, and the test delivers what SLURM
delivers at a time limit with --signal=B:TERM plus a preemption's direct SIGTERM to every step process: TERM to
the batch shell, which passes it on through torchrun, and TERM straight to each worker, so each worker gets two.
The workers must checkpoint the same step, the script must requeue the job, and the requeued job must resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_GPT
from tests.test_distributed import free_port

SCRIPT = REPO / "scripts" / "slurm" / "ftk-pretrain.sbatch"


def fake_slurm(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')  # one task on this node: the command itself
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" >> {log}; fi\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)


def workers(run: Path):
    pids = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run}"], capture_output=True, text=True).stdout.split()
    out = []
    for pid in map(int, pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ftk.cli.main" in cmdline and b"torchrun" not in cmdline and b"torch.distributed.run" not in cmdline:
            out.append(pid)
    return out


def kill_all(run: Path, shell: subprocess.Popen) -> None:
    pids = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run}"], capture_output=True, text=True).stdout.split()
    for pid in [shell.pid, *map(int, pids)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def steps_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_time_limit_checkpoints_requeues_and_the_requeued_job_resumes(corpus_dir, tmp_path):
    log, run = tmp_path / "scontrol.log", tmp_path / "run"
    fake_slurm(tmp_path / "bin", log)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_GPUS_ON_NODE": "2", "FTK_RUN_DIR": str(run), "RDZV_PORT": str(free_port())}
    args = [*TINY_GPT, "hardware.num_threads=1", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
            f"data.path={corpus_dir}"]
    shell = subprocess.Popen(["bash", str(SCRIPT), *args, "train.max_steps=100000"], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while steps_logged(run) < 3 and time.time() < deadline and shell.poll() is None:
            time.sleep(0.5)
        found = workers(run)
        assert len(found) == 2, shell.stderr.read() if shell.poll() is not None else found
        for pid in found:  # as on preemption: SIGTERM to every process of the job step
            os.kill(pid, signal.SIGTERM)
        # 0.2 s later (two signals that arrive together reach Python's handler once) the batch shell's
        # --signal=B:TERM, which it passes through srun and torchrun: each worker's second SIGTERM.
        time.sleep(0.2)
        shell.send_signal(signal.SIGTERM)
        _, err = shell.communicate(timeout=180)
    finally:
        kill_all(run, shell)
    # Before the fix the shell died on the signal (no requeue) and each worker exited on its second SIGTERM
    # without writing a checkpoint.
    assert "stopped by SIGTERM" in err, err[-3000:]
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (run / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").is_file(), err[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert not (run / "summary.json").exists()

    # The requeued job: the same script, which resumes from that checkpoint (here told to finish 2 steps later).
    again = subprocess.run(["bash", str(SCRIPT), *args, f"train.max_steps={step + 2}"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr + again.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 2
    assert log.read_text().split() == ["requeue", "4242"]  # a finished run is not requeued
