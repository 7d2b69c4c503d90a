"""The CLI: fast help, one-line errors with exit code 2, no traceback, nothing run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ftk, ftk_subprocess


def test_help_lists_every_subcommand_with_examples(capsys):
    assert ftk("--help") == 0
    out = capsys.readouterr().out
    for name in ("pretrain", "finetune", "evaluate", "merge-adapter"):
        assert f"\n  {name} " in out
    assert "examples:" in out and "ftk pretrain +recipe=gpt-tiny" in out


def test_help_imports_nothing_heavy():
    # `ftk --help` must answer at once: it may not import torch, transformers, hydra or peft.
    code = ("import sys; from ftk.cli.main import main; main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'hydra', 'peft', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_subcommand_is_one_line(capsys):
    assert ftk("pretrian") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pretrain, finetune, evaluate, merge-adapter" in err


BAD_OVERRIDES = [
    (["train.foo=1"], "unknown config key 'train.foo'; valid keys here: max_steps"),
    (["bogus=1"], "unknown config key 'bogus'; valid keys here: model, objective"),
    (["train.max_steps=abc"], "train.max_steps: Value 'abc'"),
    (["train.schedule=sideways"], "expected one of [cosine, linear, constant]"),
    (["model=gpt-tni"], "unknown option 'gpt-tni' for model; choose one of: bert-small, bert-tiny, gpt-small"),
    (["+recipe=nope"], "unknown option 'nope' for recipe; choose one of: bert-small"),
    (["model=pretrained"], "model.name_or_path is required"),
    (["data=text"], "data.path is required"),
    (["train.seq_len=4096"], "train.seq_len=4096 is larger than model.max_position_embeddings=512"),
    (["model=bert-tiny"], "cannot be trained with objective=clm"),
    (["train.max_steps=0"], "train.max_steps=0 is out of range: must be >= 1"),
    (["data.path=/no/such/corpus.txt"], "data path /no/such/corpus.txt does not exist"),
]


@pytest.mark.parametrize("overrides,expected", BAD_OVERRIDES)
def test_bad_input_stops_with_one_line(overrides, expected, tmp_path, capsys):
    # Tiny limits first, so that a check that fails to fire costs seconds, not a whole default run.
    code = ftk("pretrain", "train.max_steps=2", "data.max_documents=50", *overrides,
               f"hydra.run.dir={tmp_path / 'run'}", "hardware=cpu")
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ftk pretrain:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()


def test_real_process_exit_code_and_no_traceback(tmp_path):
    done = ftk_subprocess("pretrain", "train.foo=1", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "unknown config key 'train.foo'" in done.stderr


def test_cfg_job_prints_the_composed_config(capsys):
    assert ftk("pretrain", "+recipe=bert-tiny", "--cfg", "job") == 0
    out = capsys.readouterr().out
    assert "family: bert" in out and "name: mlm" in out and "max_steps: 600" in out
