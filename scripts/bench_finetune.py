#!/usr/bin/env python
"""Fine-tuning on this machine, side by side with the peers: packed SFT against TRL, and the memory of a 128k head.

    python scripts/bench_finetune.py --quick    # a few minutes: both parts, one round
    python scripts/bench_finetune.py            # the measurement to quote (more steps, two rounds)
    python scripts/bench_finetune.py --smoke    # tiny shapes, 2 steps: checks the script runs (numbers mean nothing)

What it measures (issue 22), each run in a fresh process (nothing - allocator, thread pools - carries over), the
sides alternating within a round:

* SFT on ../shared/data/alpaca-5k (5,000 instruction records) with a 14M-parameter GPT-2 (6 layers, width 384,
  vocab 8,192 of a BPE tokenizer trained here on the records, no dropout), the same initial weights for every side,
  batch 8 examples, train.seq_len 512, bf16, AdamW (fused), cosine schedule to 10%, lr 1e-3, clipping 1.0:
  - "ftk packed": `ftk.train.run` with the SFT objective and ftk's packed batches (ftk.data.packing: a step's 8
    examples share rows of up to 512 tokens, attention inside each example; data.packing's default);
  - "ftk padded": the same with data.packing=false (one example per row, length-grouped batches);
  - "TRL padding-free": trl.SFTTrainer with padding_free=True (each batch flattened into one row, position ids
    restarting: TRL's mode for packed training without cross-talk), bf16=True, adamw_torch_fused, completion-only
    loss. It is given ftk's tokenized examples (input_ids + completion mask) in ftk's packed run's order, so the two
    see the same examples at every step and their losses compare step by step. model.config.use_cache=False: with
    a cache transformers would not read the restarting position ids as packed sequences.
  tokens/s counts real tokens only (the examples' tokens; no padding), over the timed steps (after --warmup).
  Loss: the mean over the last 5 steps of the loss per response token.
* Peak memory of training steps for a Llama-shaped model with Llama 3's 128,256-token vocabulary (4 layers,
  width 256, untied head: 68.6M parameters, most of them in the embeddings and head), batch 2 x 1,024 tokens of
  seeded random text, bf16: ftk's loop (the CLM objective through the fused head and loss,
  ftk.objectives.linear_cross_entropy) against the Hugging Face Trainer (bf16=True, adamw_torch_fused; its model
  computes the full logits and their float32 loss). Peak = resident memory added over the run's start, sampled
  every 20 ms (ftk.peak_memory.PeakMemory), model load included.

The last two lines printed are exactly `ratio ftk/TRL SFT tokens/s: X.XX` (ftk packed / TRL padding-free) and
`ratio ftk/Trainer peak memory: X.XX`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench_throughput import trainer_clock  # scripts/ (a script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALPACA = REPO.parent / "shared" / "data" / "alpaca-5k" / "alpaca_5000.json"
SFT_SIDES = ("ftk packed", "TRL padding-free", "ftk padded")
MEMORY_SIDES = ("ftk", "Trainer")
HYPER = dict(lr=1e-3, weight_decay=0.01, beta2=0.999)


def _release_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------- set-up


def prepare_sft(work: Path, shape: Dict[str, int], seed: int) -> None:
    """Tokenizer (trained on the records), base model (seeded) and the examples, saved once for every side."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from ftk.data.tokenizer import train_tokenizer
    from ftk.schemas import Family

    records = json.loads(ALPACA.read_text())
    # A few records have an empty response, which ftk refuses as bad data: the benchmark trains on the others.
    records = [r for r in records if str(r.get("output") or "").strip()]
    (work / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [" ".join(str(r.get(k) or "") for k in ("instruction", "input", "output")) for r in records]
    tok = train_tokenizer(texts, Family.gpt2, vocab_size=shape["vocab"], model_max_length=shape["seq_len"])
    tok.save_pretrained(work / "tokenizer")
    config = GPT2Config(vocab_size=len(tok), n_embd=shape["width"], n_layer=shape["layers"], n_head=shape["heads"],
                        n_inner=4 * shape["width"], n_positions=shape["seq_len"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(work / "base")


def _examples(work: Path, shape: Dict[str, int], limit: Optional[int]):
    from transformers import AutoTokenizer

    from ftk.data.instructions import load_instruction_examples

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    examples, _ = load_instruction_examples(str(work / "alpaca.jsonl"), tok, shape["seq_len"])
    return tok, examples[:limit] if limit else examples


def _ftk_order(n: int, steps: int, batch: int, seed: int) -> List[List[int]]:
    """The examples of each step of ftk's packed run (its stream: ftk.data.examples.ExampleSource with pack_to)."""
    from ftk.data.sampler import BlockStream

    stream = BlockStream(n, seed)
    return [stream.take(s * batch, batch).tolist() for s in range(steps)]


def _train_cfg(steps: int, batch: int, seq_len: int, seed: int):
    from omegaconf import OmegaConf

    from ftk.schemas import Schedule, TrainConfig

    return OmegaConf.structured(TrainConfig(
        max_steps=steps, batch_size=batch, seq_len=seq_len, lr=HYPER["lr"], warmup_steps=0, schedule=Schedule.cosine,
        weight_decay=HYPER["weight_decay"], beta2=HYPER["beta2"], max_grad_norm=1.0, log_every=1, eval_every=0,
        eval_batches=1, save_every=0, keep_last=1, seed=seed))


def _ftk_train(job, model, objective, source, batch, seq_len) -> Dict[int, Dict[str, float]]:
    """ftk's loop as `ftk finetune` runs it on this machine (the hardware plan's bf16, matmul attention, allocator)."""
    from dataclasses import replace

    from accelerate import Accelerator

    from ftk import cpu_heap, hardware, train
    from ftk.schemas import HardwareConfig

    plan = replace(hardware.resolve(HardwareConfig(device="cpu"), batch, hardware.COMPILE_MIN_STEPS), compile=False)
    cpu_heap.set_cpu_allocator(None, lambda _: None)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    run_dir = Path(tempfile.mkdtemp(prefix="ftk-run-", dir=job["work"]))
    quiet = contextlib.nullcontext() if job["verbose"] else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            result = train.run(model=model, tokenizer=None, objective=objective, source=source,
                               train_cfg=_train_cfg(job["steps"] + job["warmup"], batch, seq_len, job["seed"]),
                               plan=plan, accelerator=accelerator, run_dir=run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {r["step"]: r for r in result.history if "loss" in r}


def _trainer_args(job, out_dir, batch, **extra):
    return dict(output_dir=str(out_dir), max_steps=job["steps"] + job["warmup"], per_device_train_batch_size=batch,
                gradient_accumulation_steps=1, learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"],
                adam_beta1=0.9, adam_beta2=HYPER["beta2"], adam_epsilon=1e-8, max_grad_norm=1.0,
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0,
                bf16=True, optim="adamw_torch_fused", logging_strategy="steps", logging_steps=1, save_strategy="no",
                eval_strategy="no", report_to="none", dataloader_num_workers=0, dataloader_pin_memory=False,
                use_cpu=True, seed=job["seed"], disable_tqdm=True, train_sampling_strategy="sequential", **extra)


# ---------------------------------------------------------------------------------------------- SFT runs


def sft_run(job: Dict[str, Any]) -> Dict[str, Any]:
    """One SFT run of one side: per-step elapsed time, real tokens and loss."""
    import torch
    from transformers import AutoModelForCausalLM

    work, shape, batch = Path(job["work"]), job["shape"], job["shape"]["batch"]
    steps = job["steps"] + job["warmup"]
    tok, examples = _examples(work, shape, job.get("limit"))
    order = _ftk_order(len(examples), steps, batch, job["seed"])
    model = AutoModelForCausalLM.from_pretrained(work / "base", attn_implementation="sdpa")
    side = job["side"]
    if side.startswith("ftk"):
        from ftk.data.examples import ExampleSource
        from ftk.objectives.sft import SupervisedFineTuning

        packed = side == "ftk packed"
        source = ExampleSource(examples, examples[:batch], tok.pad_token_id,
                               pack_to=shape["seq_len"] if packed else None)
        logged = _ftk_train(job, model, SupervisedFineTuning(), source, batch, shape["seq_len"])
        elapsed = [0.0] + [logged[s]["elapsed_s"] for s in range(1, steps + 1)]
        tokens = [0] + [logged[s]["tokens"] - (logged[s - 1]["tokens"] if s > 1 else 0) for s in range(1, steps + 1)]
        losses = [logged[s]["loss"] for s in range(1, steps + 1)]
        return {"elapsed": elapsed, "tokens": tokens, "losses": losses}
    # TRL: ftk's examples in ftk's packed run's order, tokenized identically (labels -100 on the prompt); its own padding-free collator.
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    flat = [i for step in order for i in step]
    data = Dataset.from_dict({
        "input_ids": [examples[i].input_ids for i in flat],
        "labels": [examples[i].token_labels for i in flat]})  # -100 on the prompt: completion-only loss
    model.config.use_cache = False
    clock, times, losses = trainer_clock()
    out_dir = Path(tempfile.mkdtemp(prefix="trl-run-", dir=work))
    try:
        args = SFTConfig(**_trainer_args(job, out_dir, batch), padding_free=True, max_length=None,
                         completion_only_loss=True, dataset_kwargs={"skip_prepare_dataset": True},
                         remove_unused_columns=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        quiet = contextlib.nullcontext() if job["verbose"] else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    start = times[0]
    return {"elapsed": [times[s] - start for s in range(steps + 1)],
            "tokens": [0] + [sum(len(examples[i].input_ids) for i in step) for step in order],
            "losses": [losses[s] for s in range(1, steps + 1)]}


# ---------------------------------------------------------------------------------------------- memory runs


def llama_config(shape: Dict[str, int]):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["width"], intermediate_size=shape["mlp"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=shape["seq_len"],
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def memory_run(job: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    shape, batch = job["shape"], job["shape"]["batch"]
    steps = job["steps"] + job["warmup"]
    rng = np.random.default_rng(job["seed"])
    blocks = rng.integers(3, shape["vocab"], size=(steps * batch, shape["seq_len"])).astype(np.int64)
    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_config(llama_config(shape), attn_implementation="sdpa")
    if job["side"] == "ftk":
        from ftk import train
        from ftk.objectives.clm import CausalLM

        source = train.BlockSource(blocks, blocks[:batch])
        logged = _ftk_train(job, model, CausalLM(), source, batch, shape["seq_len"])
        elapsed = [0.0] + [logged[s]["elapsed_s"] for s in range(1, steps + 1)]
        return {"elapsed": elapsed, "tokens": [0] + [batch * shape["seq_len"]] * steps,
                "losses": [logged[s]["loss"] for s in range(1, steps + 1)]}
    from transformers import PrinterCallback, Trainer, TrainingArguments

    order = np.concatenate([np.sort(s) for s in _ftk_block_order(len(blocks), steps, batch, job["seed"])])

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(order)

        def __getitem__(self, i):
            ids = torch.from_numpy(blocks[order[i]])
            return {"input_ids": ids, "labels": ids.clone()}

    clock, times, losses = trainer_clock()
    out_dir = Path(tempfile.mkdtemp(prefix="trainer-run-", dir=job["work"]))
    try:
        args = TrainingArguments(**_trainer_args(job, out_dir, batch), label_names=["labels"],
                                 remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    start = times[0]
    return {"elapsed": [times[s] - start for s in range(steps + 1)],
            "tokens": [0] + [batch * shape["seq_len"]] * steps, "losses": [losses[s] for s in range(1, steps + 1)]}


def _ftk_block_order(n: int, steps: int, batch: int, seed: int):
    from ftk.data.sampler import BlockStream

    stream = BlockStream(n, seed)
    return [stream.take(s * batch, batch) for s in range(steps)]


# ---------------------------------------------------------------------------------------------- workers


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import transformers

    from ftk.peak_memory import PeakMemory

    if not job["verbose"]:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    _release_memory()
    with PeakMemory("cpu") as memory:
        run = (sft_run if job["part"] == "sft" else memory_run)(job)
    warmup, steps = job["warmup"], job["steps"]
    elapsed, tokens = run["elapsed"], run["tokens"]
    timed = elapsed[warmup + steps] - elapsed[warmup]
    losses = run["losses"]
    return {**{k: job[k] for k in ("part", "side", "round")}, "tokens_per_s": sum(tokens[warmup + 1:]) / timed,
            "timed_s": timed, "loss_tail": statistics.fmean(losses[-min(5, len(losses)):]), "losses": losses,
            "peak_added": memory.added, "threads": torch.get_num_threads()}


def run_isolated(job: Dict[str, Any]) -> Dict[str, Any]:
    spec = Path(job["work"]) / f"job-{job['part']}-{job['side'].replace(' ', '_')}-{job['round']}.json"
    spec.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"run {spec.name} failed (exit {done.returncode}); its stderr is above")
    if job["verbose"]:
        sys.stderr.write(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report


def _median(results: List[Dict[str, Any]], part: str, side: str, key: str) -> float:
    return statistics.median(r[key] for r in results if r["part"] == part and r["side"] == side)


def summarise(results: List[Dict[str, Any]], args: argparse.Namespace, shapes: Dict[str, Any]) -> List[str]:
    lines = [f"SFT, alpaca-5k, GPT-2 {shapes['sft']['layers']} x {shapes['sft']['width']}, vocab "
             f"{shapes['sft']['vocab']:,}, batch {shapes['sft']['batch']} examples, seq_len {shapes['sft']['seq_len']}, "
             f"bf16, {args.steps} timed steps after {args.warmup}, {args.rounds} round(s), median:", "",
             "| side | real tokens/s | vs TRL | peak memory added | loss per token (last 5 steps) |",
             "|---|---:|---:|---:|---:|"]
    trl = _median(results, "sft", "TRL padding-free", "tokens_per_s")
    for side in SFT_SIDES:
        tps = _median(results, "sft", side, "tokens_per_s")
        lines.append(f"| {side} | {tps:,.0f} | {tps / trl:.2f}x | "
                     f"{_median(results, 'sft', side, 'peak_added') / 2**20:,.0f} MiB | "
                     f"{_median(results, 'sft', side, 'loss_tail'):.4f} |")
    m = shapes["memory"]
    lines += ["", f"Memory, Llama {m['layers']} x {m['width']} with a {m['vocab']:,} vocabulary, batch {m['batch']} x "
                  f"{m['seq_len']} tokens, bf16, {args.memory_steps} timed steps after 1:", "",
              "| side | peak memory added | tokens/s | loss (last step) |", "|---|---:|---:|---:|"]
    for side in MEMORY_SIDES:
        lines.append(f"| {side} | {_median(results, 'memory', side, 'peak_added') / 2**20:,.0f} MiB | "
                     f"{_median(results, 'memory', side, 'tokens_per_s'):,.0f} | "
                     f"{statistics.median(r['losses'][-1] for r in results if r['part'] == 'memory' and r['side'] == side):.4f} |")
    packed_loss = _median(results, "sft", "ftk packed", "loss_tail")
    trl_loss = _median(results, "sft", "TRL padding-free", "loss_tail")
    speed = _median(results, "sft", "ftk packed", "tokens_per_s") / trl
    mem = _median(results, "memory", "ftk", "peak_added") / _median(results, "memory", "Trainer", "peak_added")
    mem_speed = _median(results, "memory", "ftk", "tokens_per_s") / _median(results, "memory", "Trainer", "tokens_per_s")
    lines += ["", "Targets (issue 22):",
              f"- ftk packed >= 1.30x TRL at equal loss: {'MET' if speed >= 1.3 else 'not met'} ({speed:.2f}x; "
              f"loss {packed_loss:.4f} vs {trl_loss:.4f}, {100 * (packed_loss / trl_loss - 1):+.2f}%)",
              f"- 128k head: peak <= 0.5x the Trainer's at its tokens/s or better: "
              f"{'MET' if mem <= 0.5 and mem_speed >= 1.0 else 'not met'} ({mem:.2f}x memory, {mem_speed:.2f}x tokens/s)",
              "", f"ratio ftk/TRL SFT tokens/s: {speed:.2f}", f"ratio ftk/Trainer peak memory: {mem:.2f}"]
    return lines


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, one round (a few minutes)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: checks the script runs")
    p.add_argument("--steps", type=int, default=None, help="timed SFT steps per run")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps per run")
    p.add_argument("--memory-steps", type=int, default=None, help="timed steps of the memory part")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="writes bench.md and bench.json there")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick or args.smoke
    args.steps = args.steps or (2 if args.smoke else 20 if quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3 if quick else 5)
    args.memory_steps = args.memory_steps or (1 if args.smoke else 2 if quick else 4)
    args.rounds = args.rounds or (1 if quick else 2)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_job(json.loads(args.worker.read_text()))))
        return 0
    if not ALPACA.exists():
        print(f"{ALPACA} not found: this benchmark reads alpaca-5k from ../shared/data beside the checkout",
              file=sys.stderr)
        return 2
    shapes = {"sft": dict(vocab=8192, width=384, layers=6, heads=6, seq_len=512, batch=8),
              "memory": dict(vocab=128256, width=256, mlp=688, layers=4, heads=4, kv_heads=2, seq_len=1024, batch=2)}
    if args.smoke:
        shapes = {"sft": dict(vocab=1024, width=64, layers=2, heads=2, seq_len=256, batch=4),
                  "memory": dict(vocab=4096, width=64, mlp=128, layers=2, heads=2, kv_heads=1, seq_len=128, batch=2)}
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        print(f"preparing: tokenizer and base model in {work}", file=sys.stderr)
        prepare_sft(work, shapes["sft"], args.seed)
        base = dict(work=str(work), seed=args.seed, threads=args.threads, verbose=args.verbose,
                    limit=400 if args.smoke else None)
        results = []
        for round_ in range(args.rounds):
            sides = SFT_SIDES if round_ % 2 == 0 else tuple(reversed(SFT_SIDES))
            for side in sides:
                job = {**base, "part": "sft", "side": side, "round": round_, "shape": shapes["sft"],
                       "steps": args.steps, "warmup": args.warmup}
                results.append(run_isolated(job))
                r = results[-1]
                print(f"  sft {side:18s} round {round_}: {r['tokens_per_s']:,.0f} tokens/s, loss {r['loss_tail']:.4f}, "
                      f"peak +{r['peak_added'] / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
            sides = MEMORY_SIDES if round_ % 2 == 0 else tuple(reversed(MEMORY_SIDES))
            for side in sides:
                job = {**base, "part": "memory", "side": side, "round": round_, "shape": shapes["memory"],
                       "steps": args.memory_steps, "warmup": 1}
                results.append(run_isolated(job))
                r = results[-1]
                print(f"  memory {side:8s} round {round_}: peak +{r['peak_added'] / 2**20:,.0f} MiB, "
                      f"{r['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
        lines = summarise(results, args, shapes)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench.md").write_text("\n".join(lines) + "\n")
            (args.out / "bench.json").write_text(json.dumps(results, indent=1))
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
