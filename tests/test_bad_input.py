"""Bad input never costs work: each case of tests/bad_inputs.py stops with one line that names the problem and
the fix, exit code 2, no traceback, and nothing outside its run folder touched. Numeric faults stop (exit 3) or
skip batches, and never leave a checkpoint with non-finite weights."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import bad_inputs
from tests.conftest import TINY_GPT, ftk, isolated_environment, make_labelled, write_jsonl


@pytest.fixture(scope="module")
def world(pretrained, tmp_path_factory) -> dict:
    """The models and data the table's cases name: the session's tiny GPT and corpus, a labelled task and a
    LoRA classification adapter trained for two steps on it."""
    root = tmp_path_factory.mktemp("bad-input-world")
    labelled = write_jsonl(root / "labelled.jsonl", make_labelled(60))
    with isolated_environment(tmp_path_factory):
        assert ftk("finetune", *bad_inputs.TINY_FT, f"model.name_or_path={pretrained['gpt']}", "regime=lora",
                   f"data.path={labelled}", f"hydra.run.dir={root / 'lora'}") == 0
    return {"model": pretrained["gpt"], "corpus": pretrained["corpus"], "labelled": labelled,
            "adapter": root / "lora" / "final"}


def _in_process(case, argv, tmp, env, cwd, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd)
    code = ftk(case.command, *argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _unprivileged_process(case, argv, tmp, env, cwd):
    """Read-only folders hold only for a process without CAP_DAC_OVERRIDE (root ignores them otherwise)."""
    done = subprocess.run([*bad_inputs.drop_privileges(), sys.executable, "-m", "ftk.cli.main", case.command, *argv],
                          capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ, **env})
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c.name for c in bad_inputs.CASES])
def test_bad_input_table(case, world, tmp_path, monkeypatch, capsys):
    if case.prepare:
        case.prepare(tmp_path, world)
    watched = [Path(world["model"]).parent.parent, Path(world["adapter"]).parent.parent]
    before = [bad_inputs.snapshot(w) for w in watched]
    mine = bad_inputs.snapshot(tmp_path, skip=(tmp_path / "run",))
    argv, env, cwd = case.argv(world, tmp_path), case.environment(world, tmp_path), case.workdir(world, tmp_path)
    bad_inputs.make_read_only(case, tmp_path)
    try:
        if case.read_only:
            code, output = _unprivileged_process(case, argv, tmp_path, env, cwd)
        else:
            code, output = _in_process(case, argv, tmp_path, env, cwd, monkeypatch, capsys)
    finally:
        bad_inputs.restore_permissions(case, tmp_path)
    lines = bad_inputs.error_lines(case.command, output)
    assert code == 2 and len(lines) == 1 and case.expect in lines[0] and "Traceback" not in output, output[-3000:]
    # nothing touched outside the run folder: the shared models and data, and the case's own files
    assert [bad_inputs.snapshot(w) for w in watched] == before
    assert bad_inputs.changed(mine, bad_inputs.snapshot(tmp_path, skip=(tmp_path / "run",))) == []


def test_full_disk_while_saving_keeps_the_previous_checkpoint(corpus_dir, tmp_path, monkeypatch, capsys):
    import ftk.checkpoint as checkpoint

    run = tmp_path / "run"
    args = [*TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=6", "train.save_every=2", "train.keep_last=1",
            f"hydra.run.dir={run}"]
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, path, *a, **k):  # the disk fills up during the second checkpoint
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    assert ftk("pretrain", *args) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("ftk pretrain:")]
    assert len(line) == 1 and "No space left on device" in line[0] and "previous checkpoint is intact" in line[0]
    (kept,) = checkpoint.step_dirs(run / "checkpoints")
    assert kept.name == "step-0000002" and not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert ftk("pretrain", *args, "train.resume=auto") == 0  # the space is back: the run continues


@pytest.mark.parametrize("mode,code", [("stop", 3), ("skip", 3)])
def test_non_finite_loss_stops_and_never_checkpoints_bad_weights(mode, code, corpus_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from ftk import checkpoint

    run = tmp_path / "run"
    # an absurd rate blows the weights up within a few steps
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", "train.lr=1e30", "train.warmup_steps=0",
               "train.max_grad_norm=0", "train.max_steps=30", "train.save_every=1", "train.log_every=1",
               f"train.on_nonfinite={mode}", "train.max_skipped_batches=2", f"hydra.run.dir={run}") == code
    err = capsys.readouterr().err
    expected = "non-finite" if mode == "stop" else "batches skipped for non-finite losses"
    assert expected in err and "Traceback" not in err and "train.lr" in err
    for saved in checkpoint.step_dirs(run / "checkpoints"):
        weights = load_file(str(saved / "model" / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), saved
    assert not (run / "final").exists()


def test_no_pickle_or_remote_code_on_user_paths():
    """Safe loading: torch.load only with weights_only=True, trust_remote_code off unless the user sets it."""
    import re

    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("ftk", "recipes", "cli") for p in (root / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle" not in text.replace("unpickle", ""), path
        assert "trust_remote_code=True" not in text, path
        assert "shell=True" not in text and "os.system(" not in text, path
    from ftk.schemas import ModelConfig

    assert ModelConfig.trust_remote_code is False
