"""The CLI: fast help, one-line errors with exit code 2, no traceback, nothing run."""

from __future__ import annotations

import re
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


# Bad overrides and every other bad input: the one table in tests/bad_inputs.py (tests/test_bad_input.py).


def test_real_process_exit_code_and_no_traceback(tmp_path):
    done = ftk_subprocess("pretrain", "train.foo=1", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "unknown config key 'train.foo'" in done.stderr


def test_cfg_job_prints_the_composed_config(capsys):
    assert ftk("pretrain", "+recipe=bert-tiny", "--cfg", "job") == 0
    out = capsys.readouterr().out
    assert "family: bert" in out and "name: mlm" in out and "max_steps: 600" in out


@pytest.mark.parametrize("command", [name for name, (module, _) in __import__("ftk.cli.main", fromlist=["COMMANDS"])
                                     .COMMANDS.items() if module and name != "plot"])
def test_every_subcommand_names_its_timestamped_run_folder(command, capsys):
    """Each subcommand's run folder is `${ftk_now:...}`, registered however the subcommand is reached (a
    subcommand that did not register it failed at once without hydra.run.dir)."""
    assert ftk(command, "--cfg", "hydra", "--resolve") == 0
    out = capsys.readouterr().out
    assert re.search(r"dir: runs/[\w-]+/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", out), out[-2000:]
