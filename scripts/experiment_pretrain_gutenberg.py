#!/usr/bin/env python
"""Pretrain `+recipe=gpt-tiny` on the Gutenberg books for a fixed time budget and report the curve.

    python scripts/experiment_pretrain_gutenberg.py                       # 15 minutes, ../shared/data/gutenberg
    python scripts/experiment_pretrain_gutenberg.py --minutes 3 --out bench-out/quick

One book is held out of pretraining (data.validation_path inside the data folder is excluded from
training automatically). The run goes through the real CLI, exactly as a user types it; this script
only reads the run's metrics.jsonl afterwards, prints validation perplexity and tokens/s over time as
a table, and writes a PNG of the curve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gutenberg"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .txt books")
    ap.add_argument("--holdout", default="chesterton-thursday.txt", help="book held out for validation")
    ap.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    ap.add_argument("--steps", type=int, default=1400,
                    help="schedule length (the cosine decay ends here); about what fits 15 minutes of this CPU")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "pretrain-gutenberg")
    ap.add_argument("overrides", nargs="*", help="extra ftk overrides, e.g. train.lr=6e-4")
    args = ap.parse_args()
    if not (args.data / args.holdout).is_file():
        print(f"error: {args.data / args.holdout} not found; pass --data DIR --holdout BOOK.txt", file=sys.stderr)
        return 2
    run = args.out / "run"
    cmd = [sys.executable, "-m", "ftk.cli.main", "pretrain", "+recipe=gpt-tiny",
           f"data.path={args.data}", f"data.validation_path={args.data / args.holdout}",
           f"train.max_steps={args.steps}", f"train.max_minutes={args.minutes}", "train.eval_every=100",
           "train.eval_batches=0", "train.save_every=500", f"hydra.run.dir={run}", *args.overrides]
    print("$ " + " ".join(cmd[2:]).replace("ftk.cli.main", "ftk"), flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        return done.returncode
    report(run, args.out)
    return 0


def report(run: Path, out: Path) -> None:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    evals = [r for r in lines if "eval_ppl" in r]
    speeds = {r["step"]: r["tokens_per_s"] for r in lines if "tokens_per_s" in r}
    rows = ["| step | minutes | tokens seen | validation loss | validation perplexity | tokens/s |",
            "|---:|---:|---:|---:|---:|---:|"]
    for r in evals:
        near = min(speeds, key=lambda s: abs(s - r["step"])) if speeds else None
        rows.append(f"| {r['step']} | {r['elapsed_s'] / 60:.1f} | {r['tokens']:,} | {r['eval_loss']:.3f} | "
                    f"{r['eval_ppl']:.1f} | {speeds.get(near, 0):,.0f} |")
    table = "\n".join(rows)
    text = (f"{table}\n\nparameters {summary['parameters']:,}; {summary['tokens_seen']:,} tokens in "
            f"{summary['train_time_s'] / 60:.1f} min; mean {summary['tokens_per_s']:,.0f} tokens/s; "
            f"final validation perplexity {summary['final_eval_ppl']:.1f} "
            f"(precision {summary['plan']['precision']}, {summary['plan']['device']})\n")
    print(text)
    (out / "report.md").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["elapsed_s"] / 60 for r in evals], [r["eval_ppl"] for r in evals], marker="o")
    ax.set_yscale("log")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out-book perplexity")
    ax.set_title("ftk pretrain +recipe=gpt-tiny on Gutenberg")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    print(f"wrote {out / 'report.md'} and {out / 'perplexity.png'}")


if __name__ == "__main__":
    sys.exit(main())
