#!/usr/bin/env python
"""DPO speed and memory on this machine: ftk's `objective=dpo` against TRL's DPOTrainer, side by side.

    python scripts/bench_dpo.py --quick     # a few minutes: LoRA and full, 2 rounds
    python scripts/bench_dpo.py             # the measurement to quote (longer runs, 3 rounds)
    python scripts/bench_dpo.py --smoke     # tiny model, 3 steps: checks the script runs (numbers mean nothing)

The same tiny model, the same pairs, the same batches in the same order, the same optimizer, on both sides:

* Model: a GPT-2 built from a fixed seed (default 6 layers, width 384, 6 heads, vocabulary 8192, ~14M
  parameters, as scripts/bench_throughput.py), with a GPT-2-style tokenizer trained on the pairs' text, saved
  once as the base both sides load.
* Pairs: the real Anthropic HH helpful-base test split (../shared/data/hh-rlhf/helpful-base/test.jsonl.gz),
  its prompt (up to the last assistant turn) and responses split by ftk's loader, keeping the pairs that fit
  --seq-len without any cut, written as prompt/chosen/rejected strings that both sides read and tokenize
  (tests/test_preference_trl.py checks the two tokenizations agree). The batches are ftk's order (its
  stream over the pairs), fed to TRL sequentially (train_sampling_strategy="sequential").
* Training: batch --batch pairs (2 x batch sequences per step, no accumulation), beta 0.1, AdamW (fused),
  lr constant (no warm-up, so both schedules are the same), weight decay 0.01, betas (0.9, 0.999),
  clipping at 1.0, the precision ftk's hardware=cpu plan picks (bf16 where the CPU has it) on both,
  no compile, no gradient checkpointing. LoRA: r=8, alpha=16, dropout 0.05 on c_attn (ftk's regime=lora
  defaults), frozen base held in the run's 16-bit dtype on both sides. References: ftk switches the adapter
  off under LoRA and holds a frozen bf16 copy under full; TRL switches the adapter off under LoRA and keeps
  a copy in the policy's dtype (float32) under full - each side's own way.

Each run is a fresh process; sides alternate (ftk, TRL, ftk, TRL, ...) for --rounds rounds, so that a shared
machine's load falls on both. Timing excludes the first --warmup steps: tokens/s = real (unpadded) tokens of
the timed steps / their wall time (ftk: its metrics' elapsed_s at every step; TRL: a callback at each step
end). Peak memory: the resident set added over the process's start, sampled every 20 ms
(ftk.peak_memory.PeakMemory), around loading + training on both sides. "Loss at step N": each side's
training loss at its last step, which should agree (same weights, same batches).

Writes <out>/bench_dpo.md and <out>/bench_dpo.json; prints a ratio line per regime and, last,
`ratio ftk/TRL DPO tokens/s: X.XX` (the geometric mean over the regimes measured).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
LR = {"lora": 1e-3, "full": 1e-5}
BETA = 0.1


# --------------------------------------------------------------------------------------------- preparation


def prepare(out: Path, a: argparse.Namespace) -> Dict[str, Any]:
    """The base model (seeded), its tokenizer, the pairs file and the order of the batches."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftk.data.preferences import PairSource, load_pairs, record_texts
    from ftk.data.tokenizer import train_tokenizer
    from ftk.schemas import Family

    records = [json.loads(line) for line in gzip.open(a.data, "rt", encoding="utf-8")]
    tokenizer = train_tokenizer((r["chosen"] for r in records), Family.gpt2, a.vocab, model_max_length=a.seq_len)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kept = []
    for r in records:
        texts = record_texts(tokenizer, False, None, r["chosen"], r["rejected"], "hh", ("prompt", "chosen", "rejected"))
        if texts is None or not texts[1].strip() or not texts[2].strip() or texts[1] == texts[2]:
            continue
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if len(ids[0]) + max(len(ids[1]), len(ids[2])) + 1 <= a.seq_len:  # + EOS; nothing cut on either side
            kept.append(dict(zip(("prompt", "chosen", "rejected"), texts)))
    if len(kept) < a.batch + 4:
        raise SystemExit(f"only {len(kept)} HH pairs fit --seq-len {a.seq_len}; raise it")
    train, validation = kept[:-4], kept[-4:]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    torch.manual_seed(a.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=a.width, n_layer=a.layers, n_head=a.heads,
                        n_positions=max(a.seq_len, 128), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    # ftk's order of the training pairs, step by step (its loop takes positions [s*B, (s+1)*B) of this stream)
    pairs, _ = load_pairs(str(out / "train.jsonl"), tokenizer, a.seq_len)
    assert len(pairs) == len(train), "ftk dropped or cut a pair the bench kept"
    stream = PairSource(pairs, [], tokenizer.pad_token_id).stream(a.seed, a.batch)
    order = [int(i) for s in range(a.steps) for i in stream.take(s * a.batch, a.batch)]
    (out / "order.json").write_text(json.dumps(order))
    return {"pairs": len(train), "parameters": sum(p.numel() for p in GPT2LMHeadModel(config).parameters())}


def precision() -> str:
    from ftk.hardware import resolve
    from ftk.schemas import HardwareConfig
    from omegaconf import OmegaConf

    hw = OmegaConf.structured(HardwareConfig(name="cpu", device="cpu"))
    return resolve(hw, 8, 100).precision


# --------------------------------------------------------------------------------------------- the two sides


def run_ftk(out: Path, a: argparse.Namespace, regime: str, prec: str, run: Path) -> Dict[str, Any]:
    from ftk.cli.main import main

    args = ["finetune", "objective=dpo", f"objective.beta={BETA}", f"regime={regime}",
            f"model.name_or_path={out / 'base'}", f"data.path={out / 'train.jsonl'}",
            f"data.validation_path={out / 'validation.jsonl'}", "hardware=cpu", f"hardware.precision={prec}",
            f"hardware.micro_batch_size={a.batch}", "hardware.compile=false", "hardware.optimizer=adamw_fused",
            f"train.batch_size={a.batch}", f"train.seq_len={a.seq_len}", f"train.max_steps={a.steps}",
            f"train.lr={LR[regime]}", "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0.01",
            "train.beta2=0.999", "train.max_grad_norm=1.0", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.save_every=0", f"train.seed={a.seed}", f"hydra.run.dir={run}"]
    if a.threads:
        args.append(f"hardware.num_threads={a.threads}")
    code = main(args)
    if code != 0:
        raise SystemExit(f"ftk finetune exited {code}")
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in history if "loss" in r}
    w, n = a.warmup, a.steps
    tokens = steps[n]["tokens"] - steps[w]["tokens"]
    seconds = steps[n]["elapsed_s"] - steps[w]["elapsed_s"]
    return {"tokens_per_s": tokens / seconds, "timed_tokens": tokens, "loss_final": steps[n]["loss"],
            "loss_first": steps[1]["loss"], "margin_final": steps[n].get("margin")}


def run_trl(out: Path, a: argparse.Namespace, regime: str, prec: str, run: Path) -> Dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import trl

    from ftk.regimes.table import LoraSettings

    if a.threads:
        torch.set_num_threads(a.threads)
    records = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    order = json.loads((out / "order.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    bf16 = prec == "bf16"
    # LoRA: the frozen base in the run's 16-bit dtype, as ftk holds it; full: float32 weights under autocast
    dtype = torch.bfloat16 if (bf16 and regime == "lora") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=dtype)
    peft_config = None
    if regime == "lora":
        from peft import LoraConfig

        s = LoraSettings()
        peft_config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                 target_modules=["c_attn"], task_type="CAUSAL_LM", fan_in_fan_out=True)
    args = trl.DPOConfig(output_dir=str(run), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                         max_steps=a.steps, learning_rate=LR[regime], lr_scheduler_type="constant", warmup_steps=0,
                         weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, bf16=bf16,
                         use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], beta=BETA,
                         max_length=a.seq_len, train_sampling_strategy="sequential", optim="adamw_torch_fused",
                         gradient_checkpointing=False, seed=a.seed, dataloader_num_workers=0,
                         disable_tqdm=True)
    marks: List[tuple] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((state.global_step, time.perf_counter(), trainer._total_train_tokens))

    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([records[i] for i in order]),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    at = {step: (t, tokens) for step, t, tokens in marks}
    w, n = a.warmup, a.steps
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    margins = {h["step"]: h.get("rewards/margins") for h in trainer.state.log_history if "loss" in h}
    tokens = at[n][1] - at[w][1]
    return {"tokens_per_s": tokens / (at[n][0] - at[w][0]), "timed_tokens": tokens, "loss_final": losses[n],
            "loss_first": losses[1], "margin_final": margins[n]}


def worker(a: argparse.Namespace) -> None:
    """One side, one regime, in this (fresh) process: prints one JSON line."""
    from ftk.peak_memory import PeakMemory, rss_bytes

    out = Path(a.out)
    run = out / "runs" / f"{a.worker}-{a.regime}-{a.round}"
    # Both sides import the same libraries before the measurement starts: memory is the run's, not the imports'.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import ftk.recipes.finetune  # noqa: F401
    start_rss = rss_bytes()
    with PeakMemory("cpu") as memory:
        fn = run_ftk if a.worker == "ftk" else run_trl
        result = fn(out, a, a.regime, a.precision, run)
    print("RESULT " + json.dumps({"side": a.worker, "regime": a.regime, "round": a.round, **result,
                                   "peak_added": memory.added, "rss_start": start_rss}), flush=True)


# --------------------------------------------------------------------------------------------- report


def summarise(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# DPO: ftk against TRL {meta['trl']} on this machine", "",
             f"{meta['pairs']:,} HH pairs, batch {meta['batch']} pairs (x2 sequences) of at most {meta['seq_len']} "
             f"tokens, {meta['steps']} steps ({meta['warmup']} untimed), GPT-2 {meta['parameters'] / 1e6:.1f}M, "
             f"precision {meta['precision']}, {meta['threads'] or 'default'} threads, {meta['rounds']} rounds "
             f"alternating; load average {meta['load_start']} -> {meta['load_end']}", "",
             "| regime | side | tokens/s (median) | rounds | peak memory added (MiB, max) | loss at last step "
             "| margin at last step |", "|---|---|---:|---:|---:|---:|---:|"]
    ratios = {}
    for regime in meta["regimes"]:
        med = {}
        for side in ("ftk", "trl"):
            mine = [r for r in results if r["regime"] == regime and r["side"] == side]
            if not mine:
                continue
            med[side] = statistics.median(r["tokens_per_s"] for r in mine)
            peak = max(r["peak_added"] for r in mine) / 2**20
            loss = statistics.median(r["loss_final"] for r in mine)
            margin = statistics.median(r["margin_final"] or 0.0 for r in mine)
            lines.append(f"| {regime} | {'ftk' if side == 'ftk' else 'TRL'} | {med[side]:,.0f} | {len(mine)} | "
                         f"{peak:,.0f} | {loss:.4f} | {margin:.4f} |")
        if len(med) == 2:
            ratios[regime] = med["ftk"] / med["trl"]
    lines.append("")
    for regime, ratio in ratios.items():
        lines.append(f"ratio ftk/TRL DPO tokens/s ({regime}): {ratio:.2f}")
    overall = math.exp(sum(math.log(r) for r in ratios.values()) / max(len(ratios), 1)) if ratios else float("nan")
    lines.append(f"ratio ftk/TRL DPO tokens/s: {overall:.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes")
    p.add_argument("--smoke", action="store_true", help="tiny, seconds: the wiring only")
    p.add_argument("--regimes", default="lora,full")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--data", default=str(HH))
    p.add_argument("--out", default="runs/bench-dpo")
    p.add_argument("--worker", choices=("ftk", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--regime", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    if a.smoke:
        a.width, a.layers, a.heads, a.vocab, a.seq_len, a.batch = 64, 2, 2, 512, 128, 4
    steps, warmup, rounds = (3, 1, 1) if a.smoke else (12, 3, 2) if a.quick else (60, 10, 3)
    a.steps, a.warmup, a.rounds = a.steps or steps, a.warmup or warmup, a.rounds or rounds
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import trl

    prec = precision()
    meta = {"trl": trl.__version__, "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup,
            "rounds": a.rounds, "threads": a.threads, "precision": prec, "regimes": a.regimes.split(","),
            "load_start": f"{os.getloadavg()[0]:.2f}"}
    meta.update(prepare(out, a))
    print(f"prepared {meta['pairs']} pairs and a {meta['parameters'] / 1e6:.1f}M GPT-2 in {out}", flush=True)
    results = []
    common = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
              ("steps", "warmup", "batch", "seq_len", "threads", "seed", "out")]
    for round_ in range(a.rounds):
        for regime in meta["regimes"]:
            for side in ("ftk", "trl"):
                done = subprocess.run([sys.executable, __file__, f"--worker={side}", f"--regime={regime}",
                                       f"--round={round_}", f"--precision={prec}", *common, f"--out={out}"],
                                      capture_output=True, text=True)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode != 0 or not line:
                    raise SystemExit(f"{side} {regime} failed:\n{done.stderr[-3000:]}")
                result = json.loads(line[-1][len("RESULT "):])
                results.append(result)
                print(f"round {round_ + 1}/{a.rounds} {regime:5s} {side:4s}: {result['tokens_per_s']:,.0f} tokens/s, "
                      f"peak +{result['peak_added'] / 2**20:,.0f} MiB, loss {result['loss_final']:.4f}", flush=True)
    meta["load_end"] = f"{os.getloadavg()[0]:.2f}"
    text = summarise(results, meta)
    (out / "bench_dpo.md").write_text(text + "\n")
    (out / "bench_dpo.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
