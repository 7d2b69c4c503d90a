#!/usr/bin/env python
"""Every fine-tuning regime on SST-2 from one pretrained gpt-tiny, with forgetting on WikiText-2.

    python scripts/experiment_finetune_regimes.py                  # base: the Gutenberg run of
                                                                   # scripts/experiment_pretrain_gutenberg.py
    python scripts/experiment_finetune_regimes.py --steps 100 --out bench-out/quick-regimes

It converts SST-2's "label sentence" lines into jsonl under --out (the data stays in ../shared),
runs `ftk finetune` once per regime through the real CLI, each in its own process so that peak
memory (the process's resident set) and wall time are not charged with what an earlier job left
behind, into one sweep folder, and writes and prints the same comparison table a `-m` sweep writes:
regime, trainable parameters, peak memory, wall time, dev accuracy, forgetting.
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
REGIMES = "full,feature_extraction,lora,qlora,prompt_tuning,freeze_layers,gradual_unfreeze,head_then_full"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=REPO / "bench-out" / "pretrain-gutenberg" / "run" / "final",
                    help="pretrained model directory (a final/ of ftk pretrain)")
    ap.add_argument("--sst2", type=Path, default=DATA / "sst2")
    ap.add_argument("--general", type=Path, default=DATA / "wikitext-2" / "valid.txt",
                    help="general text for forgetting")
    ap.add_argument("--regimes", default=REGIMES)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "finetune-regimes")
    ap.add_argument("overrides", nargs="*", help="extra ftk overrides, e.g. train.batch_size=32")
    args = ap.parse_args()
    for path, hint in ((args.base / "config.json", "--base DIR (run scripts/experiment_pretrain_gutenberg.py)"),
                       (args.sst2 / "stsa.binary.train", "--sst2 DIR"), (args.general, "--general FILE")):
        if not path.exists():
            print(f"error: {path} not found; pass {hint}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    train = to_jsonl(args.sst2 / "stsa.binary.train", args.out / "sst2-train.jsonl")
    dev = to_jsonl(args.sst2 / "stsa.binary.dev", args.out / "sst2-dev.jsonl")
    sweep = args.out / "sweep"
    common = [f"model.name_or_path={args.base}", f"data.path={train}", f"data.validation_path={dev}",
              f"forgetting.data_path={args.general}", "forgetting.max_blocks=64", f"train.max_steps={args.steps}",
              "train.batch_size=32", "train.seq_len=128", f"train.eval_every={args.steps // 4}", "train.save_every=0",
              *args.overrides]
    for i, regime in enumerate(args.regimes.split(",")):
        run = sweep / f"{i}-{regime}"  # (no "=" in the name: Hydra would parse it as an override)
        if (run / "summary.json").exists():
            continue  # done in an earlier invocation
        cmd = [sys.executable, "-m", "ftk.cli.main", "finetune", f"regime={regime}", *common, f"hydra.run.dir={run}"]
        print("$ " + " ".join(cmd[2:]).replace("ftk.cli.main", "ftk"), flush=True)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            return done.returncode
    from ftk.sweep_report import write_comparison

    print(write_comparison(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
