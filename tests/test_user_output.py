"""What a user reads and what the cache holds: no library noise, the run folder first, the closing table whole
in a log file, the next command at the end; damaged cache entries said and rebuilt."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import TINY_GPT, ftk, make_labelled, write_jsonl

NOISE = ("LOAD REPORT", "\x1b[", "FutureWarning", "DeprecationWarning", "fan_in_fan_out", "No module named 'kernels'",
         "Traceback")


def test_damaged_cache_entries_are_said_and_rebuilt(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTK_CACHE", str(tmp_path / "cache"))
    args = [*TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=2"]
    assert ftk("pretrain", *args, f"hydra.run.dir={tmp_path / 'a'}") == 0
    capsys.readouterr()
    (blocks,) = (tmp_path / "cache" / "tokens").glob("*/train.npy")
    whole = blocks.stat().st_size
    with open(blocks, "r+b") as f:  # what a full disk or a killed copy leaves
        f.truncate(whole // 2)
    (tokenizer,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")
    tokenizer.write_text(tokenizer.read_text()[:200])

    assert ftk("pretrain", *args, f"hydra.run.dir={tmp_path / 'b'}") == 0
    out = capsys.readouterr()
    assert f"token cache: {blocks.parent} is damaged (mmap length is greater than file size); rebuilding it" in out.err
    assert f"tokenizer cache: {tokenizer.parent} is damaged; training the tokenizer again" in out.err
    assert blocks.stat().st_size == whole and np.load(blocks, mmap_mode="r").shape[1] == 64
    # the run folder comes first, the next commands last
    assert out.err.splitlines()[0] == f"run: {tmp_path / 'b'}"
    assert f"next: ftk finetune model.name_or_path={tmp_path / 'b' / 'final'} data.path=<task.jsonl>" in out.out


def test_closing_table_never_cuts_a_path_without_a_terminal(capsys):
    from ftk.runs import print_summary

    long = "/data/" + "/".join(["a-rather-long-folder-name"] * 8) + "/final"
    print_summary("ftk pretrain: somewhere", [("steps", "10"), ("saved", long)], ["ftk evaluate x=1"])
    out = capsys.readouterr().out
    assert long in out and "…" not in out and out.rstrip().endswith("next: ftk evaluate x=1")


def _ftk(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # a real process whose output goes to a pipe, as in a log file or CI: no terminal
    return subprocess.run([sys.executable, "-m", "ftk.cli.main", *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env={**os.environ, "HYDRA_FULL_ERROR": ""})


def test_finetune_and_merge_say_only_what_matters(pretrained, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(48))
    run = tmp_path / ("a-run-folder-whose-name-alone-is-wider-than-an-eighty-column-terminal-" + "x" * 30)
    done = _ftk("finetune", f"model.name_or_path={pretrained['gpt']}", "regime=lora", f"data.path={train}",
                "hardware=cpu", "hardware.precision=fp32", "train.seq_len=32", "train.batch_size=8",
                "train.max_steps=2", "train.eval_batches=2", f"hydra.run.dir={run}", cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert [n for n in NOISE if n in output] == [], output
    assert done.stderr.splitlines()[0] == f"run: {run}"
    assert str(run / "final") in done.stdout and "…" not in done.stdout  # the saved path, whole
    assert f"next: ftk evaluate adapter_path={run / 'final'} data.path=<test data>" in done.stdout
    assert f"ftk merge-adapter adapter_path={run / 'final'}" in done.stdout

    merged = tmp_path / "merged"
    done = _ftk("merge-adapter", f"adapter_path={run / 'final'}", f"output_dir={merged}", cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert [n for n in NOISE if n in output] == [], output
    assert done.stderr.splitlines()[0] == f"output: {merged}"
    assert f"next: ftk evaluate model.name_or_path={merged} data.path=<test data>" in done.stdout
    assert stat.S_IMODE(merged.stat().st_mode) & 0o055 == 0o055  # readable by others, like any folder (umask 022)
