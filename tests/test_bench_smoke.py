"""scripts/bench_throughput.py --smoke: both sides train the same tiny GPT-2 on the same blocks, and the report
carries the ratio line. The numbers of a smoke run are not a measurement; only the wiring is checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_runs_both_sides_on_the_same_weights_and_data(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_throughput.py"), "--smoke", "--regimes",
                           "lora", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^ratio ftk/Trainer tokens/s: \d+\.\d\d$", done.stdout, re.MULTILINE), done.stdout[-2000:]
    assert (out / "bench.md").read_text().count("| pretrain |") == 2
    runs = json.loads((out / "bench.json").read_text())["runs"]
    pre = {r["side"]: r for r in runs if r["regime"] == "pretrain"}
    assert pre["ftk"]["fingerprint"] == pre["trainer"]["fingerprint"]  # identical initial weights
    # Same weights, same first batch: the first losses agree (the Trainer's put on ftk's per-target basis).
    assert abs(pre["ftk"]["loss_first"] - pre["trainer"]["loss_first"]) < 1e-3 * pre["ftk"]["loss_first"]
    assert {(r["regime"], r["side"]) for r in runs} == {("pretrain", "ftk"), ("pretrain", "trainer"),
                                                         ("lora", "ftk"), ("lora", "trainer")}
    assert all(r["tokens_per_s"] > 0 and r["peak_added"] >= 0 for r in runs)
