"""scripts/throughput_on_paper.py: its parameter counts are those of the real transformers models (built on
the meta device, no memory), and its table has a row per shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import throughput_on_paper as paper  # noqa: E402


@pytest.mark.parametrize("name,shape", paper.SHAPES[:4] + paper.SHAPES[-1:])
def test_parameter_counts_match_transformers(name, shape):
    import torch
    from transformers import GPT2LMHeadModel

    from bench_throughput import gpt2_config, parameter_count

    with torch.device("meta"):
        model = GPT2LMHeadModel(gpt2_config(shape))
    assert parameter_count(shape) == sum(p.numel() for p in model.parameters()), name


def test_table_scales_inversely_with_flops():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "throughput_on_paper.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "M |" in line]
    assert len(rows) == len(paper.SHAPES)
    cpu = [float(r.split("|")[4].replace(",", "")) for r in rows]
    assert cpu == sorted(cpu, reverse=True)  # bigger models, fewer tokens per second
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "throughput_on_paper.py"), "--gpu-mfu", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
