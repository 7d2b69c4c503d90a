"""A run directory stays whole whatever happens to the process: metrics.jsonl holds each step once after any
resume, a kill while final/ is written loses no figure, damaged checkpoints are skipped or refused in one
line, one run at a time holds the directory, and a refused command changes nothing in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_GPT, ftk

FAST = [*TINY_GPT, "train.max_steps=6", "train.log_every=1", "train.eval_every=3", "hardware.num_threads=1"]


def steps(run: Path):
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def one_line(capsys, command: str, expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"ftk {command}:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes (logs aside: Hydra may open the job log)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


@pytest.fixture
def data(corpus_dir):
    return f"data.path={corpus_dir}"


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once_after_resume(data, tmp_path):
    run = tmp_path / "run"
    assert ftk("pretrain", *FAST, data, "train.save_every=0", f"hydra.run.dir={run}") == 0
    # What a kill before the first checkpoint leaves: metrics lines, no checkpoint, no final/.
    for name in ("checkpoints", "final"):
        shutil.rmtree(run / name)
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line cut short by the kill
    assert ftk("pretrain", *FAST, data, "train.resume=auto", f"hydra.run.dir={run}") == 0
    assert steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_kill_while_final_is_written_keeps_the_final_validation_figures(data, tmp_path):
    run = tmp_path / "run"
    assert ftk("pretrain", *FAST, data, f"hydra.run.dir={run}") == 0
    expected = json.loads((run / "summary.json").read_text())
    weights = (run / "final" / "model.safetensors").read_bytes()
    # What a SIGKILL inside finish() leaves: the final checkpoint, a half-written .final.tmp, no summary.json.
    (run / "summary.json").unlink()
    (run / "final").rename(run / ".final.tmp")
    (run / ".final.tmp" / "model.safetensors").write_bytes(weights[:100])
    assert ftk("pretrain", *FAST, data, "train.resume=auto", f"hydra.run.dir={run}") == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval_loss"] == expected["final_eval_loss"]
    assert summary["final_eval_ppl"] == expected["final_eval_ppl"]
    assert (run / "final" / "model.safetensors").read_bytes() == weights
    assert not (run / ".final.tmp").exists()
    assert steps(run) == [1, 2, 3, 4, 5, 6]
