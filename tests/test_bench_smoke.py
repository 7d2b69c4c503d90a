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


def _run(side, compiled, round_, tps, first_step, step_s):
    return {"regime": "pretrain", "side": side, "round": round_, "compile": compiled, "steps": 10, "warmup": 2,
            "tokens_per_s": tps, "trainable": 1000, "total": 1000, "peak_added": 2**20, "loss_final": 6.0,
            "loss_tail": 6.1, "loss_first": 9.0, "wall_s": 30.0, "first_step_s": first_step,
            "compile_s": max(0.0, first_step - step_s), "step_s_median": step_s, "loss_scale": 1.0,
            "compiled_graphs": 1 if compiled else 0}


def test_compile_row_is_reported_apart_with_its_compile_time_and_break_even():
    """--compile-row: eager ftk, compiled ftk and the Trainer are three rows; the ratio line stays eager ftk's,
    the compiled arm gets its own ratio, its compile time (cold round 1, warm later) and a break-even step."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_throughput as bench

    results = []
    for r in range(2):
        results += [_run("ftk", False, r, 2000.0, 1.2, 1.0), _run("trainer", False, r, 1900.0, 1.3, 1.05),
                    _run("ftk", True, r, 2500.0, 60.8 if r == 0 else 10.8, 0.8)]
    meta = dict(cpu="test", threads=2, capability="AVX512", bf16="yes", load_start="0", load_end="0",
                versions="", seed=0, same_init="yes", n_blocks=64, rounds=2, ft_steps=0, ft_warmup=0, ft_rounds=0,
                isolate=False, matmul_n=64, matmul_repeats=1, notes=[])
    text, key = bench.summarise(results, bench.Shape(), {"bf16": 400.0, "fp32": 150.0}, meta)
    assert text.count("| pretrain |") == 3
    assert re.search(r"^ratio ftk/Trainer tokens/s: 1\.05$", text, re.MULTILINE)
    assert "ratio ftk+compile/Trainer tokens/s: 1.32 (ftk+compile/ftk eager: 1.25)" in text
    assert "60.0s in round 1 (fresh inductor cache), 10.0s in later rounds" in text
    assert "compile pays off after 300 steps (cold cache), 50 steps (warm)" in text
    # Where ftk's plan compiles (CUDA, or --compile), the ratio line is the compiled arm's and eager is the other.
    compiled_plan = bench.summarise(results, bench.Shape(), {"bf16": 400.0, "fp32": 150.0},
                                    {**meta, "plan_compile": True})[0]
    assert re.search(r"^ratio ftk/Trainer tokens/s: 1\.32$", compiled_plan, re.MULTILINE)
    assert "the other arm: ratio ftk eager/Trainer tokens/s: 1.05" in compiled_plan
    slower = [dict(r, step_s_median=1.2) if r["compile"] else r for r in results]
    assert "compile never pays off here" in bench.summarise(slower, bench.Shape(), {"bf16": 400.0, "fp32": 150.0},
                                                            meta)[0]


@pytest.mark.slow
def test_bench_dpo_smoke_runs_ftk_and_trl_on_the_same_pairs(tmp_path):
    """scripts/bench_dpo.py --smoke: both sides train the same seeded model on the same HH pairs in the same order;
    their losses agree step for step within rounding, and the report ends with the ratio line."""
    pytest.importorskip("trl")
    hh = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    if not hh.is_file():
        pytest.skip("the shared HH data is not beside the checkout")
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_dpo.py"), "--smoke", "--regimes", "lora",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip().splitlines()[-1].startswith("ratio ftk/TRL DPO tokens/s: ")
    assert re.search(r"^ratio ftk/TRL DPO tokens/s: \d+\.\d\d$", done.stdout, re.MULTILINE)
    runs = {r["side"]: r for r in json.loads((out / "bench_dpo.json").read_text())["runs"]}
    assert set(runs) == {"ftk", "trl"} and all(r["tokens_per_s"] > 0 for r in runs.values())
    assert abs(runs["ftk"]["loss_first"] - runs["trl"]["loss_first"]) < 1e-3  # both start at log 2
    assert abs(runs["ftk"]["loss_final"] - runs["trl"]["loss_final"]) < 5e-3
