#!/usr/bin/env python
"""The evaluation table of a gpt-tiny pretrained on Gutenberg, before and after fine-tuning on SST-2.

    python scripts/experiment_evaluate.py       # after experiment_pretrain_gutenberg.py and
                                                # experiment_finetune_regimes.py
    python scripts/experiment_evaluate.py --finetuned RUN/final --num-test 200

Rows: the pretrained model, and each fine-tuned model given (default: the full and LoRA runs of the
regime sweep). Columns: perplexity on WikiText-2 valid (sliding window), 0/1/8-shot in-context accuracy
on the SST-2 test set (shots drawn from SST-2 train; a fine-tuned classifier is read through the base's
LM head on its fine-tuned body), and the classifier's own test accuracy. Every figure comes from
`ftk evaluate` runs through the real CLI; their metrics.json files are kept under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sst2 import to_jsonl  # scripts/sst2.py (a script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SWEEP = REPO / "bench-out" / "finetune-regimes" / "sweep"


def ftk_evaluate(out: Path, name: str, *overrides: str) -> dict:
    run = out / name
    if not (run / "metrics.json").exists():
        cmd = [sys.executable, "-m", "ftk.cli.main", "evaluate", *overrides, f"hydra.run.dir={run}"]
        print("$ " + " ".join(cmd[2:]).replace("ftk.cli.main", "ftk"), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
    return json.loads((run / "metrics.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=REPO / "bench-out" / "pretrain-gutenberg" / "run" / "final")
    ap.add_argument("--finetuned", type=Path, nargs="*", default=None,
                    help="fine-tuned final/ dirs (default: the full and lora runs of the regime sweep)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--num-test", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "evaluate")
    args = ap.parse_args()
    finetuned = args.finetuned
    if finetuned is None:
        finetuned = [p / "final" for p in sorted(SWEEP.glob("*-full")) + sorted(SWEEP.glob("*-lora"))]
    for path in [args.base, *finetuned]:
        if not path.exists():
            print(f"error: {path} not found; run the pretrain/finetune experiments first or pass --base/--finetuned",
                  file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    train = to_jsonl(args.data / "sst2" / "stsa.binary.train", args.out / "sst2-train.jsonl")
    test = to_jsonl(args.data / "sst2" / "stsa.binary.test", args.out / "sst2-test.jsonl")
    wikitext = args.data / "wikitext-2" / "valid.txt"

    rows = []
    for i, model in enumerate([args.base, *finetuned]):
        name = "pretrained" if i == 0 else json.loads((model / "ftk_finetune.json").read_text())["regime"]
        target = [f"model.name_or_path={model}"] if i == 0 or not (model / "adapter_config.json").exists() else \
            [f"adapter_path={model}"]
        ppl = ftk_evaluate(args.out, f"{name}-ppl", *target, "eval=perplexity", f"data.path={wikitext}",
                           "eval.context=256", "eval.stride=128")["causal"]["perplexity"]
        icl = ftk_evaluate(args.out, f"{name}-icl", *target, "eval=icl", "eval.shots=0,1,8",
                           f"eval.num_test={args.num_test}", f"data.path={train}", f"data.validation_path={test}",
                           "eval.context=256")["icl"]  # gpt-tiny was pretrained on 256-token blocks
        task = None
        if i > 0:
            task = ftk_evaluate(args.out, f"{name}-task", *target, "eval=classification",
                                f"data.path={test}")["classification"]["accuracy"]
        rows.append((name, ppl, {r["shots"]: r["accuracy"] for r in icl["rows"]}, task, icl["majority"]))

    lines = ["| model | WikiText-2 perplexity | 0-shot | 1-shot | 8-shot | fine-tuned classifier |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, ppl, shots, task, _ in rows:
        lines.append(f"| {name} | {ppl:.1f} | {shots[0]:.1%} | {shots[1]:.1%} | {shots[8]:.1%} | "
                     + (f"{task:.1%} |" if task is not None else "- |"))
    text = "\n".join(lines) + (f"\n\nSST-2 test, {args.num_test} examples for in-context learning (majority class "
                               f"{rows[0][4]:.1%}); the classifier column uses all 1,821 test sentences.\n")
    print(text)
    (args.out / "report.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
