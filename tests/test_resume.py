"""Runs that survive: a run killed at a random step and resumed gives the uninterrupted run's losses,
bit for bit (CPU, fp32); SIGTERM checkpoints and exits 75 with the resume command."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_GPT, TINY_BERT, ftk

STEPS = 40
# Slightly larger than the other tests' model so that a step takes long enough to be interrupted.
ARGS = ["model.hidden_size=128", "train.seq_len=128", "train.batch_size=16", f"train.max_steps={STEPS}",
        "train.log_every=1", "train.eval_every=10", "train.save_every=4", "train.keep_last=2",
        "model.dropout=0.1", "hardware.num_threads=1"]


def losses(run: Path):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def start(run: Path, base, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftk.cli.main", "pretrain", *base, *ARGS, *extra,
                             f"hydra.run.dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and max(losses(run) or {0: 0}) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture
def data_args(corpus_dir):
    return [f"data.path={corpus_dir}"]


@pytest.mark.parametrize("base", [TINY_GPT, TINY_BERT], ids=["clm", "mlm"])
def test_sigkill_at_random_step_then_resume_is_bit_exact(base, data_args, tmp_path):
    reference = tmp_path / "reference"
    assert ftk("pretrain", *base, *data_args, *ARGS, f"hydra.run.dir={reference}") == 0
    expected = losses(reference)
    assert len(expected) == STEPS

    run = tmp_path / "killed"
    kill_at = random.Random().randint(6, STEPS - 6)
    proc = start(run, base, *data_args)
    wait_for_step(run, proc, kill_at)
    proc.kill()  # SIGKILL: no handler runs, no checkpoint is written now
    proc.wait()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved, "a checkpoint every 4 steps must exist by step 6"
    assert len(saved) <= 2  # keep_last

    assert ftk("pretrain", *base, *data_args, *ARGS, "train.resume=auto", f"hydra.run.dir={run}") == 0
    resumed = losses(run)
    assert resumed == expected, f"killed at step {kill_at}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_seen"] == STEPS * 16 * 128


def test_sigterm_checkpoints_exits_75_and_resumes(data_args, tmp_path):
    run = tmp_path / "run"
    proc = start(run, TINY_GPT, *data_args)
    wait_for_step(run, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = max(losses(run))
    assert f"checkpoint saved to {run / 'checkpoints' / f'step-{stopped:07d}'}" in err
    assert "train.resume=auto" in err and "Traceback" not in err
    assert not (run / "final").exists()
    assert ftk("pretrain", *TINY_GPT, *data_args, *ARGS, "train.resume=auto", f"hydra.run.dir={run}") == 0
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


def test_resume_auto_continues_a_finished_run_to_more_steps(data_args, tmp_path):
    run = tmp_path / "run"
    assert ftk("pretrain", *TINY_GPT, *data_args, "train.max_steps=6", "train.log_every=1",
               f"hydra.run.dir={run}") == 0
    assert ftk("pretrain", *TINY_GPT, *data_args, "train.max_steps=9", "train.log_every=1", "train.resume=auto",
               f"hydra.run.dir={run}") == 0
    assert sorted(losses(run)) == list(range(1, 10))
    assert json.loads((run / "summary.json").read_text())["steps"] == 9


@pytest.mark.parametrize("regime", ["lora", "gradual_unfreeze"])
def test_finetune_preempted_and_resumed_gives_the_uninterrupted_losses(regime, pretrained, tmp_path):
    from tests.conftest import make_labelled, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(96, seed=1))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_labelled(30, seed=2))
    # dropout draws (LoRA) and an unfreezing schedule must both resume exactly
    own = {"lora": "regime.lora_dropout=0.1", "gradual_unfreeze": "regime.unfreeze_every=3"}[regime]
    args = [f"model.name_or_path={pretrained['gpt']}", f"regime={regime}", own, "hardware=cpu", "hardware.precision=fp32", "hardware.num_threads=1",
            "train.batch_size=8", "train.seq_len=64", "train.max_steps=16", "train.log_every=1", "train.eval_every=8",
            "train.save_every=2", f"data.path={train}", f"data.validation_path={dev}"]
    reference = tmp_path / "reference"
    assert ftk("finetune", *args, f"hydra.run.dir={reference}") == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ftk.cli.main", "finetune", *args, f"hydra.run.dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert ftk("finetune", *args, "train.resume=auto", f"hydra.run.dir={run}") == 0
    assert losses(run) == losses(reference)
    assert json.loads((run / "summary.json").read_text())["final_eval_accuracy"] == \
        json.loads((reference / "summary.json").read_text())["final_eval_accuracy"]


def test_kills_during_saves_never_leave_a_broken_newest_checkpoint(data_args, tmp_path):
    """save_every=1 makes saving a large share of the run, so random SIGKILLs land inside saves."""
    from ftk import checkpoint

    run = tmp_path / "run"
    extra = ["train.save_every=1", "train.keep_last=2", "train.resume=auto"]
    rng = random.Random()
    for attempt in range(4):
        proc = start(run, TINY_GPT, *data_args, *extra)
        if attempt == 0:
            wait_for_step(run, proc, 2)
        time.sleep(rng.uniform(0.2, 1.5))
        proc.kill()
        proc.wait()
        newest = checkpoint.latest(run / "checkpoints")
        if newest is None:
            continue
        state = checkpoint.load_state(newest)  # every file of the newest complete checkpoint loads
        assert (newest / "model" / "model.safetensors").is_file()
        checkpoint.load_tensors(newest / "optimizer.pt")
        checkpoint.load_tensors(newest / "scheduler.pt")
        assert newest.name == f"step-{state.step:07d}"
    assert ftk("pretrain", *TINY_GPT, *data_args, *ARGS, *extra, f"hydra.run.dir={run}") == 0
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
