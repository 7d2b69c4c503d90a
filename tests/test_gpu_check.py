"""scripts/gpu_check.py on this CPU: the same cases as on a GPU server at toy size, so the script that will be
run the first time a GPU is available keeps working until then (~1.5 minutes)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_runs_every_case_at_toy_size_on_a_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert lines[-1] == "gpu check: 9 passed, 0 failed", lines[-12:]
    rows = {line[:38].strip(): line[38:].split()[0] for line in lines[-10:-1]}
    assert rows == {case: "pass" for case in (
        "pretrain (default)", "finetune classification + validation", "finetune lora", "finetune qlora",
        "gradual_unfreeze + compile", "early stopping", "evaluate", "merge-adapter", "generate")}, lines[-10:]
    assert (tmp_path / "merged" / "config.json").is_file()
