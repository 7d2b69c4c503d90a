"""A run directory stays whole whatever happens to the process: metrics.jsonl holds each step once after any
resume, a kill while final/ is written loses no figure, damaged checkpoints are skipped or refused in one
line, one run at a time holds the directory, and a refused command changes nothing in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_GPT, ftk

QUICK = [*TINY_GPT, "train.log_every=1", "train.eval_every=3", "hardware.num_threads=1"]
FAST = [*QUICK, "train.max_steps=6"]


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


def test_a_refused_command_leaves_the_stopped_runs_config_as_it_was(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert ftk("pretrain", *FAST, data, "train.save_every=3", f"hydra.run.dir={run}") == 0
    shutil.rmtree(run / "final")  # as a stopped run: checkpoints, no final/
    (run / "summary.json").unlink()
    before = snapshot(run)
    capsys.readouterr()
    # Reusing the unfinished run's directory without resume: refused, and its config stays the run's.
    assert ftk("pretrain", *FAST, data, "train.lr=0.5", "train.max_steps=99", f"hydra.run.dir={run}") == 2
    one_line(capsys, "pretrain", "holds checkpoints of an unfinished run; continue it with train.resume=auto")
    assert snapshot(run) == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".hydra-")]


def test_a_second_run_in_a_busy_run_directory_is_refused_and_touches_nothing(data, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [*QUICK, data, "train.save_every=2", f"hydra.run.dir={run}"]
    first = subprocess.Popen([sys.executable, "-m", "ftk.cli.main", "pretrain", *args, "train.max_steps=400"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").is_file() and len(steps(run)) >= 3 and (run / "checkpoints").is_dir()):
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run: its directory must not change under the second
        time.sleep(0.5)
        before = snapshot(run)
        for extra in ([], ["train.resume=auto"]):
            assert ftk("pretrain", *args, "train.max_steps=400", *extra) == 2
            line = one_line(capsys, "pretrain", f"{run} is in use by process {first.pid}")
            assert "hydra.run.dir" in line
            assert snapshot(run) == before
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 75, err[-2000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    stopped = steps(run)
    assert stopped == list(range(1, len(stopped) + 1))  # each step once, none of the second command's
    # The lock dies with its process: the run resumes at once.
    assert ftk("pretrain", *args, f"train.max_steps={stopped[-1] + 2}", "train.resume=auto") == 0
    assert steps(run) == list(range(1, stopped[-1] + 3))


def losses(run: Path):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.parametrize("damage", ["optimizer_missing", "optimizer_truncated", "state_malformed",
                                    "weights_flipped"])
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_refuses_it_by_name(damage, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = [*FAST, data, "train.save_every=2", f"hydra.run.dir={run}"]
    assert ftk("pretrain", *args) == 0
    expected = losses(run)
    shutil.rmtree(run / "final")  # a stopped run: checkpoints step-4 and step-6
    (run / "summary.json").unlink()
    newest = run / "checkpoints" / "step-0000006"
    if damage == "optimizer_missing":
        (newest / "optimizer.pt").unlink()
    elif damage == "optimizer_truncated":
        data_ = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data_[: len(data_) // 2])
    elif damage == "state_malformed":
        (newest / "trainer_state.json").write_text('{"step": 6, ')
    else:  # same size, one byte changed
        weights = bytearray((newest / "model" / "model.safetensors").read_bytes())
        weights[-3] ^= 0xFF
        (newest / "model" / "model.safetensors").write_bytes(bytes(weights))
    capsys.readouterr()

    assert ftk("pretrain", *args, f"train.resume={newest}") == 2
    one_line(capsys, "pretrain", f"train.resume={newest} is a damaged checkpoint (")

    assert ftk("pretrain", *args, "train.resume=auto") == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "damaged" in line]
    assert len(skipped) == 1 and f"checkpoint {newest} is damaged (" in skipped[0], err
    assert "resuming from " + str(run / "checkpoints" / "step-0000004") in err and "Traceback" not in err
    assert losses(run) == expected  # steps 5 and 6 again, as they were
    assert steps(run) == [1, 2, 3, 4, 5, 6]


def records(run: Path):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_a_resume_that_changes_the_training_is_refused_unless_accepted_and_then_applied(corpus_dir, tmp_path,
                                                                                       capsys):
    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    run = tmp_path / "run"
    args = [*FAST, f"data.path={data}", "train.save_every=3", f"hydra.run.dir={run}"]
    assert ftk("pretrain", *args) == 0
    first = records(run)
    shutil.rmtree(run / "final")  # stopped after step 6 with checkpoints at 3 and 6: resume from 3 below
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    before = snapshot(run)
    capsys.readouterr()

    assert ftk("pretrain", *args, "train.resume=auto", "train.lr=0.001", "train.batch_size=4") == 2
    line = one_line(capsys, "pretrain", "train.batch_size 8 -> 4; train.lr 0.003 -> 0.001")
    assert "train.accept_changes=true" in line and str(run / "checkpoints" / "step-0000003") in line
    assert snapshot(run) == before  # .hydra/config.yaml still says lr 0.003

    (data / "doc000.txt").write_bytes(bytes(range(256)) * 4)  # the same path, other bytes
    assert ftk("pretrain", *args, "train.resume=auto") == 2
    one_line(capsys, "pretrain", f"data.path (contents) changed")
    assert snapshot(run) == before
    shutil.copy(corpus_dir / "doc000.txt", data / "doc000.txt")  # put back, but its mtime has changed
    assert ftk("pretrain", *args, "train.resume=auto", "train.lr=0.001", "train.accept_changes=true") == 0
    err = capsys.readouterr().err
    assert "with train.accept_changes=true: data.path (contents) changed; train.lr 0.003 -> 0.001" in err
    after = records(run)
    assert sorted(after) == [1, 2, 3, 4, 5, 6] and all(after[s] == first[s] for s in (1, 2, 3))
    for s in (4, 5, 6):  # the new peak lr, on the same schedule
        assert after[s]["lr"] == pytest.approx(first[s]["lr"] / 3, rel=1e-9)
    (log,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert log["step"] == 3 and log["changes"]["train.lr"] == [0.003, 0.001]
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / ".hydra" / "config.yaml").train.lr == 0.001
    # The changed settings are now the run's: extending it needs no new acceptance.
    assert ftk("pretrain", *args, "train.resume=auto", "train.lr=0.001", "train.max_steps=8") == 0
    assert sorted(records(run)) == list(range(1, 9))


def test_a_finetune_resume_on_a_retrained_base_or_another_regime_setting_is_refused(pretrained, tmp_path, capsys):
    from tests.conftest import make_labelled, write_jsonl

    base = tmp_path / "base"
    shutil.copytree(pretrained["gpt"], base)
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(48, seed=1))
    run = tmp_path / "run"
    args = [f"model.name_or_path={base}", "regime=lora", "hardware=cpu", "hardware.precision=fp32",
            "hardware.num_threads=1", "train.batch_size=8", "train.seq_len=64", "train.max_steps=4",
            "train.save_every=2", f"data.path={train}", f"hydra.run.dir={run}"]
    assert ftk("finetune", *args) == 0
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    before = snapshot(run)
    capsys.readouterr()
    assert ftk("finetune", *args, "train.resume=auto", "regime.lora_r=16") == 2
    one_line(capsys, "finetune", "regime.lora_r 8 -> 16")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base / "model.safetensors"))  # the base retrained in place: same path, same shape
    weights["transformer.h.0.attn.c_attn.weight"] *= 1.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert ftk("finetune", *args, "train.resume=auto") == 2
    one_line(capsys, "finetune", "model.weights (fingerprint) changed")
    assert snapshot(run) == before
