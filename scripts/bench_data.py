#!/usr/bin/env python
"""Data preparation at scale (issue 20): preparation time, tokens/s with 1 and N processes, peak RSS, cache size
and the warm start of `ftk pretrain`, for synthetic corpora of growing size.

    python scripts/bench_data.py --out /tmp/bench-data                  # 0.1, 1 and 4 GB (hours on 2 cores)
    python scripts/bench_data.py --out /tmp/bench-data --sizes 0.1 1    # what this machine had time for
    python scripts/bench_data.py --out /tmp/bench-data --quick          # 0.01 and 0.04 GB: the script runs

Corpora: JSON lines, each document 1-12 paragraphs drawn at random (seeded) from the 14 Gutenberg books of
../shared/data/gutenberg (paragraphs are split on blank lines; undecodable bytes replaced), written to --out
(never into the repository) until the size is reached. The tokenizer: a gpt2-style byte-level BPE of 8,192 tokens
trained once on the books and given to every run (model.tokenizer=...), as a cluster job would.

Per size, each in a fresh process with its own cache folder:
  * `ftk prepare ... data.num_proc=1` and `data.num_proc=N` (N = --procs, default: the cores): wall time, the
    tokens/s ftk reports, and peak RSS of the whole process tree (the main process and its tokenizing workers,
    sampled every 50 ms from /proc); the two caches are compared byte for byte;
  * the cache's size on disk;
  * `ftk pretrain ... train.max_steps=1` on the warm cache: seconds from the command's start to the end of the
    first training step (summary.json's first_step_s) and the command's wall time.
Ratios are against peers in this same run: the speed-up of N processes over 1, and each size's peak RSS over
the smallest size's. "workers fed" is the workers' CPU seconds per CPU second of the main process (which reads,
packs and writes): how many busy tokenizing processes one main process keeps up with, i.e. the num_proc up to
which the speed-up can stay near-linear on a machine with that many free cores. On a shared machine the
measured speed-up is bounded by the cores others leave free; this ratio is not, nor are the tokens per CPU
second (all processes' CPU time), which stay flat from 1 to N processes when the parallel work costs nothing
extra. Prints a markdown table (and writes it to <out>/bench_data.md, raw numbers to .json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import psutil

REPO = Path(__file__).resolve().parents[1]
GUTENBERG = REPO.parent / "shared" / "data" / "gutenberg"
MODEL = ("model=gpt-tiny", "hardware=cpu", "train.seq_len=256", "train.batch_size=8", "train.eval_batches=1",
         "train.warmup_steps=0", "train.save_every=0")


def paragraphs() -> List[str]:
    out = []
    for book in sorted(GUTENBERG.glob("*.txt")):
        text = book.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        out += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    if not out:
        sys.exit(f"no Gutenberg books under {GUTENBERG}: this script reads ../shared/data/gutenberg")
    return out


def build_corpus(path: Path, size_bytes: int, paras: List[str], seed: int = 0) -> None:
    if path.is_file() and path.stat().st_size >= size_bytes:
        return
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_bytes:
            doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 12)))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    tmp.replace(path)


def build_tokenizer(folder: Path, paras: List[str]) -> Path:
    if (folder / "tokenizer.json").is_file():
        return folder
    sys.path.insert(0, str(REPO))
    from ftk.data.tokenizer import train_tokenizer
    from ftk.schemas import Family

    tok = train_tokenizer(paras, Family.gpt2, 8192, 1024)
    tok.save_pretrained(folder)
    return folder


def run_measured(args: List[str], env: Dict[str, str]) -> Dict[str, float]:
    """Run a command; wall time and the peak RSS summed over its process tree (sampled every 50 ms)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=env["BENCH_CWD"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    output = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(args)}\n{output[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "peak_rss": peak, "output": output}


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for corpora, caches and runs (not the repo)")
    parser.add_argument("--sizes", nargs="+", type=float, default=[0.1, 1.0, 4.0], help="corpus sizes in GB")
    parser.add_argument("--quick", action="store_true", help="sizes 0.01 and 0.04 GB")
    parser.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)), help="N for data.num_proc=N")
    parser.add_argument("--report", action="store_true",
                        help="only print the table again from <out>/bench_data.json and the folders a run left")
    opts = parser.parse_args()
    out = opts.out.resolve()
    if out == REPO or REPO in out.parents:
        sys.exit("--out must be outside the repository")
    sizes = [0.01, 0.04] if opts.quick else opts.sizes
    if opts.report:
        report(out, json.loads((out / "bench_data.json").read_text()), sizes, opts)
        return
    out.mkdir(parents=True, exist_ok=True)
    paras = paragraphs()
    tokenizer = build_tokenizer(out / "tokenizer-8k", paras)
    ftk = [sys.executable, "-m", "ftk.cli.main"]
    rows = []
    for size in sizes:
        corpus = out / f"corpus-{size:g}GB.jsonl"
        t0 = time.perf_counter()
        build_corpus(corpus, int(size * 1e9), paras)
        print(f"corpus {corpus} ({corpus.stat().st_size / 1e9:.2f} GB) ready in {time.perf_counter() - t0:.0f}s",
              flush=True)
        common = [*MODEL, f"data.path={corpus}", f"model.tokenizer={tokenizer}"]
        row: Dict[str, object] = {"size_gb": round(corpus.stat().st_size / 1e9, 3)}
        caches = {}
        for procs in (1, opts.procs):
            cache = out / f"cache-{size:g}GB-{procs}proc"
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
            env = {**os.environ, "FTK_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "BENCH_CWD": str(out)}
            m = run_measured([*ftk, "prepare", *common, f"data.num_proc={procs}"], env)
            (entry,) = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
            meta = json.loads((entry / "meta.json").read_text())
            caches[procs] = entry
            row[f"prep_s_{procs}"] = round(m["wall_s"], 1)
            row[f"tok_s_{procs}"] = round(meta["tokens"] / meta["seconds"])
            row[f"rss_{procs}"] = m["peak_rss"]
            row[f"cpu_s_{procs}"] = round(meta["main_cpu_s"] + meta["workers_cpu_s"], 1)
            if procs > 1:  # CPU seconds of the tokenizing workers per CPU second of the main process feeding them
                row["feedable"] = round(meta["workers_cpu_s"] / max(meta["main_cpu_s"], 1e-9), 1)
            row.update(tokens=meta["tokens"], documents=meta["documents"], cache_bytes=meta["cache_bytes"])
            print(f"  prepare num_proc={procs}: {m['wall_s']:.1f}s, {row[f'tok_s_{procs}']:,} tokens/s, "
                  f"peak RSS {m['peak_rss'] / 1e9:.2f} GB", flush=True)
        row["identical"] = all(digest(caches[1] / f) == digest(caches[opts.procs] / f)
                               for f in ("train.npy", "validation.npy"))
        env = {**os.environ, "FTK_CACHE": str(out / f"cache-{size:g}GB-{opts.procs}proc"), "HF_HUB_OFFLINE": "1",
               "BENCH_CWD": str(out)}
        run = out / f"run-{size:g}GB"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        m = run_measured([*ftk, "pretrain", *common, "train.max_steps=1", f"hydra.run.dir={run}"], env)
        assert "(from cache)" in m["output"], m["output"][-2000:]
        summary = json.loads((run / "summary.json").read_text())
        row["warm_first_step_s"] = round(summary["first_step_s"], 1)
        row["warm_blocks_s"] = summary.get("blocks_s")
        row["warm_wall_s"] = round(m["wall_s"], 1)
        rows.append(row)
        print(f"  warm pretrain: first step after {row['warm_first_step_s']}s", flush=True)
        (out / "bench_data.json").write_text(json.dumps(rows, indent=1))  # kept as it goes: a size at a time
    report(out, rows, sizes, opts)


def num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def per_cpu(r: Dict, procs: int) -> str:
    cpu = r.get(f"cpu_s_{procs}")
    return "-" if not cpu else f"{r['tokens'] / cpu:,.0f}"


def report(out: Path, rows: List[Dict], sizes: List[float], opts: argparse.Namespace) -> None:
    for r in rows:  # fill in what an earlier version of this script did not record, from what its runs left
        size = f"{r['size_gb']:g}"
        summary = out / f"run-{size}GB" / "summary.json"
        if r.get("warm_blocks_s") is None and summary.is_file():
            r["warm_blocks_s"] = json.loads(summary.read_text()).get("blocks_s")
        for procs in (1, opts.procs):
            for meta in out.glob(f"cache-{size}GB-{procs}proc/tokens/*/meta.json"):
                m = json.loads(meta.read_text())
                if m.get("main_cpu_s") is not None:
                    r.setdefault(f"cpu_s_{procs}", round(m["main_cpu_s"] + m["workers_cpu_s"], 1))
                    if procs > 1 and r.get("feedable") is None:
                        r["feedable"] = round(m["workers_cpu_s"] / max(m["main_cpu_s"], 1e-9), 1)
    base_rss = rows[0][f"rss_{opts.procs}"]
    n = opts.procs
    lines = [f"| corpus | tokens | prepare 1 proc | prepare {n} procs | tokens/s 1 proc | tokens/s {n} procs | "
             f"speed-up | tokens per CPU-s 1 proc | tokens per CPU-s {n} procs | workers fed | same tokens | peak RSS 1 proc | peak RSS {n} procs | RSS / smallest | cache | "
             "warm start to first step | of which finding the blocks |",
             "|" + "---|" * 17]
    for r in rows:
        lines.append(
            f"| {r['size_gb']:.2f} GB | {r['tokens']:,} | {r['prep_s_1']:.0f} s | {r[f'prep_s_{n}']:.0f} s | "
            f"{r['tok_s_1']:,} | {r[f'tok_s_{n}']:,} | {r[f'tok_s_{n}'] / r['tok_s_1']:.2f}x | "
            f"{per_cpu(r, 1)} | {per_cpu(r, n)} | {num(r.get('feedable'), '.0f')} | {'yes' if r['identical'] else 'NO'} | {r['rss_1'] / 1e9:.2f} GB | {r[f'rss_{n}'] / 1e9:.2f} GB | "
            f"{r[f'rss_{n}'] / base_rss:.2f}x | {r['cache_bytes'] / 1e9:.2f} GB | {r['warm_first_step_s']:.1f} s | "
            f"{num(r.get('warm_blocks_s'), '.2f')} s |")
    table = "\n".join(lines)
    print()
    print(f"python scripts/bench_data.py --out {opts.out} " + ("--quick" if opts.quick else "--sizes " + " ".join(
        f"{s:g}" for s in sizes)) + f" --procs {n}   # {psutil.cpu_count()} CPUs on this machine")
    print(table)
    (out / "bench_data.md").write_text(table + "\n")
    (out / "bench_data.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
