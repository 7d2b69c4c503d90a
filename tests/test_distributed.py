"""Distributed data parallel on this CPU: 2 processes (gloo) give the losses of 1 process with the same
global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import TINY_GPT, ftk

ARGS = [*TINY_GPT, "train.max_steps=6", "train.log_every=1", "train.eval_every=3", "hardware.num_threads=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(corpus_dir, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    assert ftk("pretrain", *ARGS, f"data.path={corpus_dir}", f"hydra.run.dir={single}") == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "ftk.cli.main", "pretrain", *ARGS,
                           f"data.path={corpus_dir}", f"hydra.run.dir={double}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["plan"]["world_size"] == 2 and summary["plan"]["strategy"] == "ddp"
    one, two = history(single), history(double)
    assert [r["step"] for r in one] == [r["step"] for r in two]  # one metrics.jsonl, written by rank 0 only
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert summary["tokens_seen"] == json.loads((single / "summary.json").read_text())["tokens_seen"]
    assert done.stderr.count("ftk pretrain:") == 0 and done.stdout.count("ftk pretrain:") <= 1
