#!/usr/bin/env python
"""Training throughput on this machine: ftk's loop against the Hugging Face Trainer, same model, data and steps.

    python scripts/bench_throughput.py --quick     # about 3 minutes: pretraining + full/LoRA/QLoRA fine-tuning
    python scripts/bench_throughput.py             # the measurement to quote (about 15 minutes)
    python scripts/bench_throughput.py --steps 60 --warmup 10 --rounds 3 --threads 2 --compile
    python scripts/bench_throughput.py --smoke     # tiny model, 2 steps: checks the script runs (numbers mean nothing)

What it measures (issue 7), in one invocation:

* Pretraining a 14M-parameter GPT-2 (6 layers, width 384, 6 heads, vocab 8192, tied embeddings, no dropout),
  batch 8 x 256, built from a fixed seed. ftk runs its real loop, `ftk.train.run`, with a `BlockSource`, the
  CLM objective, the `Plan` ftk's hardware planner makes for hardware=cpu (here: bf16, adamw_fused, matmul
  attention, compile off; --compile / --no-compile override compile), `Accelerator(cpu=True,
  mixed_precision="bf16")` and the allocator setting `ftk pretrain` picks when the memory plan fits
  (ftk.cpu_heap.set_cpu_allocator). The Trainer runs with its best settings on this CPU (bf16=True,
  optim="adamw_torch_fused"; SDPA, the model's configured attention). Both get the same initial weights
  (checked by a fingerprint),
  the same blocks in the same order (ftk's BlockStream order, fed to the Trainer sequentially), the same
  AdamW hyper-parameters, gradient clipping and cosine schedule (no lr warm-up, so the two schedules are
  identical), and the same number of steps. The sides alternate (ftk, Trainer, ftk, Trainer, ...) for
  --rounds rounds, each run in a fresh process, so that neither inherits the other's process-wide settings
  (the allocator, thread pools); --same-process runs them all in this one.
* Fine-tuning the same model, saved as a base: full, LoRA (r=8, alpha=16, dropout 0.05 on peft's GPT-2
  default target c_attn) and QLoRA (NF4 double-quantised base, bf16 compute, the same LoRA), through ftk's
  regimes (`ftk.regimes.apply`, `ftk.regimes.qlora_base.load_4bit_base`) and through Trainer + peft.

Timing: a run's first --warmup steps are excluded; tokens/s = timed steps x batch x seq_len / their wall
time, read from ftk's metrics (elapsed_s logged every step; the final validation and checkpoint come
after the last step and are not timed) and from a TrainerCallback (time at on_step_end). tokens/s is the
median over rounds. Peak RSS is `ftk.peak_memory.PeakMemory` around model load + training (RSS added over
the run's start, sampled every 20 ms; freed memory is returned to the OS with malloc_trim between runs).
MFU is model FLOPs per token x tokens/s over a bf16 matmul peak this script measures (the formula is printed).

Writes <out>/bench.md (the table) and <out>/bench.json (every run's raw numbers); the last lines printed
include `ratio ftk/Trainer tokens/s: X.XX` for pretraining.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub: models are built from configs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ftk.regimes.table import LoraSettings  # noqa: E402  (torch-free)

LORA = LoraSettings()  # ftk's regime=lora/qlora defaults, for the peer's LoraConfig too
# Learning rate, weight decay, beta2 per run kind: pretraining as recipe gpt-tiny (beta2 0.95, wd 0.1);
# fine-tuning as configs/train/finetune.yaml and the regime's own rate.
HYPER = {"pretrain": (1e-3, 0.1, 0.95), "full": (1e-4, 0.01, 0.999), "lora": (1e-3, 0.01, 0.999),
         "qlora": (1e-3, 0.01, 0.999)}
LOSS_TOLERANCE = 0.01  # "same loss": ftk's loss after N steps within 1% of the Trainer's


@dataclass
class Shape:
    vocab: int = 8192
    width: int = 384
    layers: int = 6
    heads: int = 6
    seq_len: int = 256
    batch: int = 8


SMOKE_SHAPE = Shape(vocab=512, width=64, layers=2, heads=2, seq_len=64, batch=4)


# ---------------------------------------------------------------------------------------------- data, model


def token_blocks(n_blocks: int, shape: Shape, seed: int):
    """A seeded Zipf-Mandelbrot token stream with bigram structure, as (n_blocks, seq_len) int32 blocks.

    Token frequencies follow 1/(rank + 2.7)^1.07 (like words in text); half of the tokens are one of four
    likely successors of the previous token, so there is something to learn beyond unigram frequencies.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    p = 1.0 / (np.arange(1, shape.vocab + 1) + 2.7) ** 1.07
    p /= p.sum()
    successors = rng.choice(shape.vocab, size=(shape.vocab, 4), p=p)
    unigram = rng.choice(shape.vocab, size=(n_blocks, shape.seq_len), p=p)
    follow = rng.random((n_blocks, shape.seq_len)) < 0.5
    which = rng.integers(0, 4, size=(n_blocks, shape.seq_len))
    ranks = np.empty((n_blocks, shape.seq_len), dtype=np.int64)
    ranks[:, 0] = unigram[:, 0]
    for t in range(1, shape.seq_len):
        ranks[:, t] = np.where(follow[:, t], successors[ranks[:, t - 1], which[:, t]], unigram[:, t])
    ids = rng.permutation(shape.vocab)  # rank -> token id, so frequent tokens are not simply the low ids
    return ids[ranks].astype(np.int32)


def gpt2_config(shape: Shape):
    from transformers import GPT2Config

    special = shape.vocab - 1  # GPT2Config's default ids (50256) lie outside a small vocabulary
    return GPT2Config(vocab_size=shape.vocab, n_embd=shape.width, n_layer=shape.layers, n_head=shape.heads,
                      n_inner=4 * shape.width, n_positions=shape.seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=special, eos_token_id=special)


def build_model(shape: Shape, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(gpt2_config(shape), attn_implementation="sdpa")


def fingerprint(model) -> str:
    """A checksum of the weights (float64 sums of every parameter, in order)."""
    import torch

    with torch.no_grad():
        total = sum(float(p.detach().double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))
    return f"{total:.6e}"


def flop_terms(shape: Shape) -> Dict[str, int]:
    """Matmul weights per token (transformer blocks + the tied LM-head projection) and attention FLOPs."""
    d, inner = shape.width, 4 * shape.width
    blocks = shape.layers * (d * 3 * d + d * d + d * inner + inner * d)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    head = shape.vocab * d
    return {"block_matmul": blocks, "head_matmul": head, "n_matmul": blocks + head,
            "attention": 12 * shape.layers * d * shape.seq_len}


def parameter_count(shape: Shape) -> int:
    """Parameters of the GPT-2 built here (tied LM head counted once)."""
    d = shape.width
    per_block = 12 * d * d + 13 * d  # weights and biases of c_attn, c_proj, c_fc, mlp.c_proj; two LayerNorms
    return shape.vocab * d + shape.seq_len * d + shape.layers * per_block + 2 * d


def flops_per_token(shape: Shape, regime: str, trainable: int) -> float:
    """PaLM (Chowdhery et al. 2022, App. B): 6N + 12 L H Q T per token, N = matmul weights. With frozen
    weights (LoRA/QLoRA) the weight gradient is not needed: 4N + 6 N_trainable + 12 L H Q T."""
    f = flop_terms(shape)
    if regime in ("lora", "qlora"):
        return 4 * f["n_matmul"] + 6 * trainable + f["attention"]
    return 6 * f["n_matmul"] + f["attention"]


def matmul_peak(n: int, dtype_name: str, repeats: int) -> float:
    """GFLOP/s of one n x n x n torch.matmul (2 n^3 FLOPs), best of `repeats`, at torch's thread count."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------- one run


def _release_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - only informative
        return 0


def _stream_order(n_blocks: int, steps: int, batch: int, seed: int):
    """The blocks ftk's loop reads, step by step (BlockStream positions, sorted within a batch as
    BlockSource.train_batch does): the Trainer gets the same sequence through a sequential sampler."""
    import numpy as np

    from ftk.data.sampler import BlockStream

    stream = BlockStream(n_blocks, seed)
    return np.concatenate([np.sort(stream.take(s * batch, batch)) for s in range(steps)])


def _load_model(job: Dict[str, Any], side: str):
    """The model a run starts from: built from the seed (pretraining) or the saved base (fine-tuning)."""
    import torch
    from transformers import AutoModelForCausalLM

    regime, shape = job["regime"], Shape(**job["shape"])
    if regime == "pretrain":
        return build_model(shape, job["seed"])
    base = str(Path(job["work"]) / "base")
    if regime in ("full", "lora"):
        model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    elif side == "ftk":
        from ftk.regimes.qlora_base import load_4bit_base

        model = load_4bit_base(base, AutoModelForCausalLM, torch.bfloat16, attn_implementation="sdpa")
    else:  # what a Trainer + peft user writes; the same quantisation settings as ftk's (NF4, double quant)
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map={"": "cpu"},
                                                     attn_implementation="sdpa")
        # ftk does not checkpoint activations unless asked (hardware.gradient_checkpointing); peft's default
        # would, which costs ~30% more compute: off here too, so both sides do the same work.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(job["seed"] + 1)  # LoRA's A matrices: the same draw on both sides
    if side == "ftk":
        from omegaconf import OmegaConf

        from ftk import regimes
        from ftk.regimes.table import settings_of
        from ftk.schemas import Objective

        settings = OmegaConf.merge(settings_of(regime), {"lr": job["lr"]})
        model = regimes.apply(regime, model, regimes.Context(settings, Objective.clm, [])).model
    elif regime in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA.lora_r, lora_alpha=LORA.lora_alpha, lora_dropout=LORA.lora_dropout,
                                                 task_type="CAUSAL_LM"))
    return model


def _counts(model):
    from ftk.models import count_parameters

    return count_parameters(model)


def ftk_plan(shape: Shape):
    """The plan ftk makes itself on this machine (hardware=cpu, everything else auto) for a run long enough
    for compile to pay off where ftk thinks it does (the timed steps here are a slice of such a run)."""
    from ftk import hardware
    from ftk.schemas import HardwareConfig

    return hardware.resolve(HardwareConfig(device="cpu"), shape.batch, hardware.COMPILE_MIN_STEPS)


def _ftk_run(job: Dict[str, Any], model) -> Dict[str, Any]:
    import numpy as np
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from ftk import cpu_heap, train
    from ftk.objectives.clm import CausalLM
    from ftk.schemas import Schedule, TrainConfig

    shape = Shape(**job["shape"])
    steps, warmup = job["warmup"] + job["steps"], job["warmup"]
    cfg = OmegaConf.structured(TrainConfig(
        max_steps=steps, batch_size=shape.batch, seq_len=shape.seq_len, lr=job["lr"], warmup_steps=0,
        schedule=Schedule.cosine, weight_decay=job["weight_decay"], beta2=job["beta2"], max_grad_norm=1.0,
        log_every=1, eval_every=0, eval_batches=1, save_every=0, keep_last=1, seed=job["seed"]))
    plan = replace(ftk_plan(shape), compile=bool(job["compile"]))
    # As `ftk pretrain` / `ftk finetune` on this machine, where the plan fits with room to spare: freed tensors
    # stay in the heap for the next step (ftk.cpu_heap.set_cpu_allocator). This is process-wide, hence --isolate.
    cpu_heap.set_cpu_allocator(None, lambda _: None)
    # As ftk.session.start does: ftk's compile switch is accelerate's dynamo backend (prepare() wraps the model
    # in torch.compile). Plan(compile=True) alone compiles nothing: the loop itself never calls torch.compile.
    accelerator = Accelerator(cpu=True, mixed_precision="bf16",
                              dynamo_backend="inductor" if job["compile"] else "no")
    work = Path(job["work"])
    source = train.BlockSource(np.load(work / "train.npy"), np.load(work / "validation.npy"))
    run_dir = Path(tempfile.mkdtemp(prefix="ftk-run-", dir=work))
    quiet = contextlib.nullcontext() if job["verbose"] else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:  # ftk prints one progress line per logged step off a terminal
            result = train.run(model=model, tokenizer=None, objective=CausalLM(), source=source, train_cfg=cfg,
                               plan=plan, accelerator=accelerator, run_dir=run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    logged = {r["step"]: r for r in result.history if "loss" in r}
    elapsed = {0: 0.0, **{s: r["elapsed_s"] for s, r in logged.items()}}
    return {"attention": getattr(getattr(model, "config", None), "_attn_implementation", "?"),
            "times": [elapsed[s] for s in range(steps + 1)],
            "losses": [logged[s]["loss"] for s in range(1, steps + 1)],
            "final_eval_loss": result.final_eval.get("eval_loss")}


def trainer_clock():
    """A Trainer callback recording the time at the start and after every step, and the loss it logs, by step:
    (callback, times, losses). Also used by scripts/bench_finetune.py."""
    from transformers import TrainerCallback

    times: Dict[int, float] = {}
    losses: Dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    return Clock(), times, losses


def _trainer_run(job: Dict[str, Any], model) -> Dict[str, Any]:
    import numpy as np
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    shape = Shape(**job["shape"])
    steps = job["warmup"] + job["steps"]
    work = Path(job["work"])
    blocks = np.load(work / "train.npy")
    order = _stream_order(len(blocks), steps, shape.batch, job["seed"])

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(order)

        def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
            ids = torch.from_numpy(blocks[order[i]].astype(np.int64))
            return {"input_ids": ids, "labels": ids.clone()}

    clock, times, losses = trainer_clock()
    out_dir = Path(tempfile.mkdtemp(prefix="trainer-run-", dir=work))
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=shape.batch,
        gradient_accumulation_steps=1, learning_rate=job["lr"], weight_decay=job["weight_decay"], adam_beta1=0.9,
        adam_beta2=job["beta2"], adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, bf16=True, optim="adamw_torch_fused",
        torch_compile=bool(job["compile"]), logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", dataloader_num_workers=0, dataloader_pin_memory=False,
        use_cpu=True, seed=job["seed"], disable_tqdm=True, train_sampling_strategy="sequential",
        label_names=["labels"], remove_unused_columns=False)
    try:
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        # The Trainer divides the summed loss by num_items_in_batch. It counts labels[..., 1:] only when it
        # recognises a causal-LM loss (`_loss_shifts_labels`, from model.loss_type); for GPT-2 in some
        # transformers versions loss_type is None, so it counts all B*S labels while B*(S-1) are targets, and
        # logs (and trains on) the mean loss times (S-1)/S. Logged losses are put on ftk's basis (mean over
        # targets) here; the gradient scale differs by the same factor, which AdamW all but ignores.
        counts_all = bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and \
            getattr(trainer, "_loss_shifts_labels", True) is False
        scale = shape.seq_len / (shape.seq_len - 1) if counts_all else 1.0
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    start = times[0]
    return {"times": [times[s] - start for s in range(steps + 1)],
            "losses": [losses[s] * scale for s in range(1, steps + 1)], "loss_scale": scale,
            "final_eval_loss": None}


_PRIMED = False


def prime(job: Dict[str, Any]) -> None:
    """Pay what only the first run of a process would pay (lazy imports, thread pools, oneDNN and autocast
    set-up) before anything is measured: every library imported and one tiny untimed run per side."""
    global _PRIMED
    if _PRIMED:
        return
    _PRIMED = True
    import numpy as np

    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers
    from peft import LoraConfig, get_peft_model  # noqa: F401

    import ftk.regimes.lora  # noqa: F401
    import ftk.train  # noqa: F401

    if not job["verbose"]:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if job["regime"] == "qlora" or job.get("prime_qlora"):
        import bitsandbytes  # noqa: F401

        import ftk.regimes.qlora_base  # noqa: F401
    work = Path(job["work"]) / "prime"
    if not (work / "train.npy").exists():
        work.mkdir(parents=True, exist_ok=True)
        np.save(work / "train.npy", token_blocks(4 * SMOKE_SHAPE.batch, SMOKE_SHAPE, 0))
        np.save(work / "validation.npy", token_blocks(SMOKE_SHAPE.batch, SMOKE_SHAPE, 1))
    # In a process of its own (--isolate, the default) a run primes only its own side: an ftk run sets the
    # process's allocator (ftk.cpu_heap.set_cpu_allocator), which the Trainer run must not inherit.
    for side in (job["side"],) if job.get("isolated") else ("ftk", "trainer"):
        tiny = {**job, "regime": "pretrain", "side": side, "shape": asdict(SMOKE_SHAPE), "steps": 1, "warmup": 1,
                "work": str(work), "compile": False}
        _reset_accelerate()
        model = _load_model(tiny, side)
        (_ftk_run if side == "ftk" else _trainer_run)(tiny, model)
        del model


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """One training run (one side, one regime, one round); returns its timings, losses and peak memory."""
    import torch

    from ftk.peak_memory import PeakMemory

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    prime(job)
    _reset_accelerate()
    _release_memory()
    graphs = _compiled_graphs()
    started = time.perf_counter()
    with PeakMemory("cpu") as memory:
        model = _load_model(job, job["side"])
        trainable, total = _counts(model)
        fp = fingerprint(model) if job["regime"] == "pretrain" else None
        run = (_ftk_run if job["side"] == "ftk" else _trainer_run)(job, model)
        del model
    wall = time.perf_counter() - started
    shape, warmup, steps = Shape(**job["shape"]), job["warmup"], job["steps"]
    times = run["times"]
    timed = times[warmup + steps] - times[warmup]
    step_s = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    losses = run["losses"]
    _release_memory()
    return {
        **{k: job[k] for k in ("regime", "side", "round", "compile", "steps", "warmup")},
        "plan_compile": job.get("plan_compile", False),
        "tokens_per_s": steps * shape.batch * shape.seq_len / max(timed, 1e-9), "timed_s": timed,
        "step_s_median": statistics.median(step_s), "step_s_max": max(step_s),
        # The first step carries torch.compile's tracing and kernel generation (and any lazy set-up); what it
        # takes beyond a steady step is the compile cost, reported apart and never part of tokens/s.
        "first_step_s": times[1] - times[0], "compile_s": max(0.0, times[1] - times[0] - statistics.median(step_s)),
        "loss_first": losses[0], "loss_final": losses[-1], "loss_tail": statistics.fmean(losses[-min(5, len(losses)):]),
        "losses": losses, "loss_scale": run.get("loss_scale", 1.0),
        "final_eval_loss": run["final_eval_loss"], "peak_added": memory.added, "peak_rss": memory.peak,
        "wall_s": wall, "trainable": trainable, "total": total, "fingerprint": fp,
        "compiled_graphs": _compiled_graphs() - graphs, "threads": torch.get_num_threads(),
        "attention": run.get("attention", "sdpa"),
    }


def run_isolated(job: Dict[str, Any]) -> Dict[str, Any]:
    """run_job in a fresh Python process: nothing (allocator, caches, threads) carries over between runs."""
    spec = Path(job["work"]) / f"job-{job['regime']}-{job['side']}-{int(job['compile'])}-{job['round']}.json"
    spec.write_text(json.dumps({**job, "isolated": True}))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"run {spec.name} failed (exit {done.returncode}); its stderr is above")
    if job["verbose"]:
        sys.stderr.write(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _seconds(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _what(side: str, regime: str, compile_: bool, results: List[Dict[str, Any]]) -> str:
    graphs = max((r["compiled_graphs"] for r in results), default=0)
    if side == "ftk":
        comp = "compile off" if not compile_ else (
            f"compile on ({graphs} graphs)" if graphs else "compile requested (plan.compile) but not applied by ftk")
        attention = {"ftk_cpu_matmul": "matmul attention"}.get(results[0].get("attention", ""), "SDPA") \
            if results else "SDPA"
        core = f"ftk.train.run, bf16 autocast, adamw_fused, {attention}, chunked cross-entropy, {comp}"
        extra = {"full": "; regime full", "lora": "; regime lora",
                 "qlora": "; load_4bit_base + regime qlora"}.get(regime, "")
    else:
        comp = "torch_compile off" if not compile_ else (
            f"torch_compile on ({graphs} graphs)" if graphs else "torch_compile requested, no graph compiled")
        core = f"Trainer, bf16=True, adamw_torch_fused, SDPA, {comp}"
        extra = {"full": "", "lora": "; peft LoRA",
                 "qlora": "; bnb NF4 + prepare_model_for_kbit_training + peft LoRA"}.get(regime, "")
    return core + extra


def summarise(results: List[Dict[str, Any]], shape: Shape, peaks: Dict[str, float], meta: Dict[str, Any]):
    """The markdown report and the comparison lines; returns (text, key numbers)."""
    f = flop_terms(shape)
    tokens_per_step = shape.batch * shape.seq_len
    rows, key = [], {}
    order = [r for r in ("pretrain", "full", "lora", "qlora") if any(x["regime"] == r for x in results)]
    for regime in order:
        for side, compiled in (("ftk", False), ("ftk", True), ("trainer", False), ("trainer", True)):
            runs = [r for r in results if r["regime"] == regime and r["side"] == side and r["compile"] == compiled]
            if not runs:
                continue
            # With --compile-row the ftk side runs both ways: the arms are keyed "ftk+compile" and "ftk eager",
            # and "ftk" (the ratio line) is the one ftk's plan picks by itself.
            both = len({r["compile"] for r in results if r["regime"] == regime and r["side"] == side}) > 1
            name = (f"{side}+compile" if compiled else f"{side} eager") if both else side
            tps = statistics.median(r["tokens_per_s"] for r in runs)
            flops = flops_per_token(shape, regime, runs[0]["trainable"])
            mfu = flops * tps / (peaks["bf16"] * 1e9)
            peak = statistics.median(r["peak_added"] for r in runs)
            loss = statistics.median(r["loss_final"] for r in runs)
            key[(regime, name)] = dict(tps=tps, mfu=mfu, peak=peak, loss=loss,
                                       tail=statistics.median(r["loss_tail"] for r in runs),
                                       first=statistics.median(r["loss_first"] for r in runs),
                                       first_step=[r["first_step_s"] for r in runs],
                                       compile_s=[r["compile_s"] for r in runs],
                                       step_s=statistics.median(r["step_s_median"] for r in runs))
            label = "pretrain" if regime == "pretrain" else f"finetune {regime}"
            per_round = " / ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
            first = " / ".join(_seconds(r["first_step_s"]) for r in runs)
            rows.append(
                f"| {label} | {'ftk' if side == 'ftk' else 'HF Trainer'} | "
                f"{_what(side, regime, runs[0]['compile'], runs)} | {_count(runs[0]['trainable'])} | "
                f"**{tps:,.0f}** | {per_round} | {mfu:.1%} | "
                f"{_mib(peak)} | {loss:.4f} | {first} | {_seconds(statistics.median(r['wall_s'] for r in runs))} |")

    ft_runs = [r for r in results if r["regime"] != "pretrain"]
    pre_runs = [r for r in results if r["regime"] == "pretrain"]
    lines = [
        "# ftk vs Hugging Face Trainer: training throughput on this CPU",
        "",
        f"- machine: {meta['cpu']}, {meta['threads']} torch threads, CPU capability {meta['capability']}, "
        f"bf16 matmul support: {meta['bf16']}; load average at start {meta['load_start']}, at end {meta['load_end']}",
        f"- versions: {meta['versions']}",
        f"- model: GPT-2, {parameter_count(shape) / 1e6:.2f}M parameters ({shape.layers} layers, width {shape.width}, "
        f"{shape.heads} heads, vocab {shape.vocab}, {shape.seq_len} positions, tied embeddings, no dropout, "
        f"SDPA in its config), "
        f"built from seed {meta['seed']}; initial weights identical on both sides: {meta['same_init']}",
        f"- data: seeded Zipf-bigram token stream, {meta['n_blocks']} blocks of {shape.seq_len}; both sides read "
        f"the same blocks in the same order (ftk's BlockStream order; the Trainer through a sequential sampler)",
        f"- batch {shape.batch} x {shape.seq_len} = {tokens_per_step:,} tokens/step; AdamW (beta1 0.9, eps 1e-8), "
        f"grad clip 1.0, cosine schedule to 0.1x without lr warm-up on both sides; lr / weight decay / beta2: "
        + ", ".join(f"{k} {v[0]:g}/{v[1]:g}/{v[2]:g}" for k, v in HYPER.items() if k in order),
        f"- timing: pretraining {pre_runs[0]['warmup'] if pre_runs else '-'} warm-up + "
        f"{pre_runs[0]['steps'] if pre_runs else '-'} timed steps x {meta['rounds']} rounds, fine-tuning "
        f"{meta['ft_warmup']} + {meta['ft_steps']} x {meta['ft_rounds']}; sides alternate ftk, Trainer; tokens/s "
        f"is the median over rounds (each round listed); final validation/checkpoint not timed; "
        f"{'one fresh process per run' if meta['isolate'] else 'all runs in one process'}",
        f"- matmul peak measured here ({meta['matmul_n']}^3 torch.matmul, best of {meta['matmul_repeats']}, "
        f"at start and end): bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s",
        f"- MFU = model FLOPs/token x tokens/s / bf16 peak; model FLOPs/token = 6N + 12*L*d*S (PaLM, App. B) with "
        f"N = {f['n_matmul'] / 1e6:.2f}M matmul weights ({f['block_matmul'] / 1e6:.2f}M in the blocks + "
        f"{f['head_matmul'] / 1e6:.2f}M tied LM-head projection; lookups excluded) and 12*L*d*S = "
        f"{f['attention'] / 1e6:.2f}M: {flops_per_token(shape, 'pretrain', 0) / 1e6:.1f} MFLOP/token, so the bf16 "
        f"peak bounds this model at {peaks['bf16'] * 1e9 / flops_per_token(shape, 'pretrain', 0):,.0f} tokens/s. "
        f"LoRA/QLoRA: 4N + 6*N_trainable + 12*L*d*S (frozen weights need no weight gradient)",
        f"- peak RSS: ftk.peak_memory.PeakMemory around model load + training (RSS added over the run's start); "
        f"loss: the training loss of the last step (pretraining step "
        f"{(pre_runs[0]['warmup'] + pre_runs[0]['steps']) if pre_runs else '-'}, fine-tuning step "
        f"{(ft_runs[0]['warmup'] + ft_runs[0]['steps']) if ft_runs else '-'}), median over rounds; wall s: the "
        f"whole run (model load, all steps, ftk's final validation and checkpoint); first step s: the first "
        f"optimizer step, which carries torch.compile's tracing and code generation when compile is on (not in "
        f"tokens/s; inductor caches kernels on disk, so a later run of the same shapes compiles faster)",
        "",
        "| run | side | what ran | trainable | tokens/s (median) | per round | MFU | peak RSS added | loss @ last step "
        "| first step s (per round) | wall s |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---|---:|",
        *rows,
        "",
    ]
    verdicts = []
    if ("pretrain", "ftk+compile") in key and ("pretrain", "ftk eager") in key:
        key[("pretrain", "ftk")] = key[("pretrain", "ftk+compile" if meta.get("plan_compile") else "ftk eager")]
    if ("pretrain", "ftk") in key and ("pretrain", "trainer") in key:
        a, b = key[("pretrain", "ftk")], key[("pretrain", "trainer")]
        ratio = a["tps"] / b["tps"]
        key["ratio"] = ratio
        dloss = a["loss"] - b["loss"]
        same_loss = abs(dloss) <= LOSS_TOLERANCE * b["loss"]
        lines += [
            f"pretraining loss at step 1 (same weights, same batch: differs only by kernels): ftk {a['first']:.4f}, "
            f"Trainer {b['first']:.4f}",
            f"pretraining loss at the last step: ftk {a['loss']:.4f}, Trainer {b['loss']:.4f} (difference "
            f"{dloss:+.4f}; mean of the last 5 steps {a['tail']:.4f} vs {b['tail']:.4f})",
            f"ratio ftk/Trainer tokens/s: {ratio:.2f}",
        ]
        if ("pretrain", "ftk+compile") in key and ("pretrain", "ftk eager") in key:
            c, e = key[("pretrain", "ftk+compile")], key[("pretrain", "ftk eager")]
            other, o = ("ftk eager", e) if meta.get("plan_compile") else ("ftk+compile", c)
            saved = e["step_s"] - c["step_s"]
            cold, warm = c["compile_s"][0], (statistics.median(c["compile_s"][1:]) if len(c["compile_s"]) > 1
                                             else None)
            lines += [
                f"ftk's plan {'compiles' if meta.get('plan_compile') else 'runs eagerly'}; the other arm: ratio "
                f"{other}/Trainer tokens/s: {o['tps'] / b['tps']:.2f} (ftk+compile/ftk eager: "
                f"{c['tps'] / e['tps']:.2f}); loss at the last step {o['loss']:.4f}",
                f"compile time (first step beyond a steady step, not in tokens/s): {cold:.1f}s in round 1 (fresh "
                f"inductor cache)" + (f", {warm:.1f}s in later rounds (inductor's cache warm)" if warm is not None
                                      else ""),
                ("compile pays off after " + f"{cold / saved:,.0f} steps (cold cache)" +
                 (f", {warm / saved:,.0f} steps (warm)" if warm is not None else "")
                 if saved > 0 else "compile never pays off here: the compiled step is not faster")
                + f" (steady step {e['step_s']:.3f}s eager vs {c['step_s']:.3f}s compiled)",
            ]
        verdicts += [
            f"- pretraining tokens/s >= 1.30x the Trainer's: {'MET' if ratio >= 1.3 else 'not met'} ({ratio:.2f}x)",
            f"- same loss after {pre_runs[0]['warmup'] + pre_runs[0]['steps']} steps (within "
            f"{LOSS_TOLERANCE:.0%}): {'MET' if same_loss else 'not met'} ({dloss:+.4f})",
            f"- MFU >= 60% of the measured bf16 matmul peak: {'MET' if a['mfu'] >= 0.6 else 'not met'} "
            f"({a['mfu']:.1%}; 60% is {0.6 * peaks['bf16'] * 1e9 / flops_per_token(shape, 'pretrain', 0):,.0f} "
            f"tokens/s)",
        ]
    for regime in ("full", "lora", "qlora"):
        if (regime, "ftk") in key and (regime, "trainer") in key:
            lines.append(f"ratio ftk/Trainer tokens/s (finetune {regime}): "
                         f"{key[(regime, 'ftk')]['tps'] / key[(regime, 'trainer')]['tps']:.2f}")
    for side, name in (("ftk", "ftk"), ("trainer", "Trainer + peft")):
        if ("lora", side) in key and ("full", side) in key:
            lo, full = key[("lora", side)], key[("full", side)]
            verdicts.append(
                f"- {name}: LoRA faster than full fine-tuning: {'yes' if lo['tps'] > full['tps'] else 'no'} "
                f"({lo['tps']:,.0f} vs {full['tps']:,.0f} tokens/s); lower peak memory: "
                f"{'yes' if lo['peak'] < full['peak'] else 'no'} ({_mib(lo['peak'])} vs {_mib(full['peak'])})")
    if verdicts:
        lines += ["", "Targets of issue 7 (this run):", *verdicts]
    scales = {r["loss_scale"] for r in results if r["side"] == "trainer" and r["loss_scale"] != 1.0}
    if scales:
        lines += ["", f"note: the Trainer's logged losses are multiplied by S/(S-1) = {max(scales):.5f} to be per "
                      "target token like ftk's: this transformers version recognises no causal-LM loss type on "
                      "GPT-2, so it divides the summed loss by all B*S labels (Trainer._loss_shifts_labels is "
                      "False) while only B*(S-1) are targets; its gradients are scaled by (S-1)/S too"]
    if meta.get("notes"):
        lines += ["", *[f"note: {n}" for n in meta["notes"]]]
    return "\n".join(lines) + "\n", key


# ---------------------------------------------------------------------------------------------- main


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 3 minutes: fewer steps and rounds")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model (width 64, 2 layers, vocab 512, batch 4 x 64) for 1 + 2 steps: checks that "
                         "everything runs; the numbers are not a measurement")
    ap.add_argument("--steps", type=int, help="timed pretraining steps per run (default 40; --quick 12)")
    ap.add_argument("--warmup", type=int, help="untimed pretraining steps before them (default 5; --quick 3)")
    ap.add_argument("--rounds", type=int, help="pretraining rounds, each one ftk run then one Trainer run "
                                               "(default 3; --quick 2)")
    ap.add_argument("--ft-steps", type=int, help="timed fine-tuning steps per run (default 20; --quick 8)")
    ap.add_argument("--ft-warmup", type=int, help="untimed fine-tuning steps (default 3; --quick 2)")
    ap.add_argument("--ft-rounds", type=int, help="fine-tuning rounds (default 2; --quick 1)")
    ap.add_argument("--regimes", default="full,lora,qlora",
                    help="fine-tuning regimes to compare, comma-separated (full, lora, qlora); '' or none skips "
                         "fine-tuning")
    ap.add_argument("--no-pretrain", action="store_true", help="skip the pretraining comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every run (default: torch's)")
    compile_ = ap.add_mutually_exclusive_group()
    compile_.add_argument("--compile", action="store_true", default=None,
                          help="ftk side: compile every run (by default ftk's plan decides: off on a CPU, where it "
                               "does not pay off)")
    compile_.add_argument("--no-compile", dest="compile", action="store_false",
                          help="ftk side: never compile (eager)")
    ap.add_argument("--compile-row", action="store_true",
                    help="pretraining: a third arm per round, ftk with torch.compile the other way from its plan "
                         "(eager when the plan compiles), so both are measured side by side (compile time "
                         "reported apart, round 1 with a fresh inductor cache)")
    ap.add_argument("--trainer-compile", action="store_true",
                    help="Trainer side: TrainingArguments(torch_compile=True) (off by default: not its best here)")
    ap.add_argument("--same-process", dest="isolate", action="store_false",
                    help="run every training run in this process instead of one fresh process per run (faster "
                         "start-up; but ftk sets the process's allocator for reuse, and the Trainer runs after "
                         "the first ftk run inherit it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matmul-n", type=int, default=None, help="matrix size of the peak measurement (default 2048)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "throughput",
                    help="directory for bench.md and bench.json")
    ap.add_argument("--verbose", action="store_true", help="show ftk's progress lines and library warnings")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick or args.smoke
    if args.smoke:
        args.isolate = False  # a check that everything runs: no numbers to protect, no process start-ups to pay
    defaults = dict(steps=40, warmup=5, rounds=3, ft_steps=20, ft_warmup=3, ft_rounds=2, matmul_n=2048)
    if quick:
        defaults.update(steps=12, warmup=3, rounds=2, ft_steps=8, ft_warmup=2, ft_rounds=1)
    if args.smoke:  # one thread: tiny ops on a busy machine are far slower with two spinning OpenMP threads
        defaults.update(steps=2, warmup=1, rounds=1, ft_steps=2, ft_warmup=1, ft_rounds=1, matmul_n=256, threads=1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "rounds", "ft_steps", "ft_rounds", "warmup", "ft_warmup", "matmul_n"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    args.regimes = [r for r in args.regimes.replace(" ", "").split(",") if r and r != "none"]
    unknown = [r for r in args.regimes if r not in ("full", "lora", "qlora")]
    if unknown:
        ap.error(f"--regimes: unknown {unknown}; pick from full, lora, qlora")
    if args.no_pretrain and not args.regimes:
        ap.error("nothing to run: --no-pretrain and no --regimes")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:  # one run in this fresh process (--isolate); the result is the last stdout line
        result = run_job(json.loads(args.worker.read_text()))
        print(json.dumps(result))
        return 0
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = _load_average()
    shape = SMOKE_SHAPE if args.smoke else Shape()
    notes = []
    if args.smoke:
        notes.append("--smoke: a tiny model and 2 timed steps; these numbers are not a measurement")
    regimes = list(args.regimes)
    if "qlora" in regimes:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            regimes.remove("qlora")
            notes.append("qlora skipped: bitsandbytes is not installed (pip install 'ftk[quant]')")
    if args.no_pretrain and not regimes:
        print("nothing to run: --no-pretrain and no fine-tuning regime left", file=sys.stderr)
        return 2

    print(f"measuring the matmul peak ({args.matmul_n}^3) ...", flush=True)
    repeats = 3 if args.smoke else 10
    peaks = {d: matmul_peak(args.matmul_n, d, repeats) for d in ("bf16", "fp32")}
    print(f"  bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s", flush=True)

    max_steps = max(([] if args.no_pretrain else [args.warmup + args.steps]) +
                    ([args.ft_warmup + args.ft_steps] if regimes else []))
    n_blocks = max(64, max_steps * shape.batch)  # one epoch covers every run: no block is read twice
    work = Path(tempfile.mkdtemp(prefix="ftk-bench-"))
    if args.compile is not False or args.compile_row or args.trainer_compile:
        # Inductor keeps compiled kernels on disk (by default /tmp/torchinductor_<user>): a fresh cache here makes
        # round 1 show what a first compile costs and later rounds what a run with a warm cache pays.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")
    results: List[Dict[str, Any]] = []
    try:
        np.save(work / "train.npy", token_blocks(n_blocks, shape, args.seed))
        np.save(work / "validation.npy", token_blocks(2 * shape.batch, shape, args.seed + 1))
        if regimes:
            build_model(shape, args.seed).save_pretrained(work / "base", safe_serialization=True)
        common = dict(shape=asdict(shape), seed=args.seed, threads=args.threads, work=str(work),
                      verbose=args.verbose, prime_qlora="qlora" in regimes)
        plan = []
        if not args.no_pretrain:
            for r in range(args.rounds):
                for side in ("ftk", "trainer"):
                    plan.append(dict(regime="pretrain", side=side, round=r, steps=args.steps, warmup=args.warmup))
                if args.compile_row:
                    flipped = not (ftk_plan(shape).compile if args.compile is None else args.compile)
                    plan.append(dict(regime="pretrain", side="ftk", round=r, steps=args.steps, warmup=args.warmup,
                                     compile=flipped))
        for r in range(args.ft_rounds):
            for regime in regimes:
                for side in ("ftk", "trainer"):
                    plan.append(dict(regime=regime, side=side, round=r, steps=args.ft_steps, warmup=args.ft_warmup))
        for i, job in enumerate(plan):
            lr, wd, beta2 = HYPER[job["regime"]]
            if job["side"] == "ftk":
                default = ftk_plan(shape).compile if args.compile is None else args.compile
                job.setdefault("compile", default)
                job["plan_compile"] = default  # what the main ftk row runs with; --compile-row flips it
            job.setdefault("compile", args.trainer_compile)
            job.update(common, lr=lr, weight_decay=wd, beta2=beta2)
            name = ("ftk+c" if job["compile"] else "ftk") if job["side"] == "ftk" else "Trainer"
            print(f"[{i + 1}/{len(plan)}] {job['regime']:8s} {name:7s} round {job['round'] + 1}: "
                  f"{job['warmup']} + {job['steps']} steps ...", end=" ", flush=True)
            result = run_isolated(job) if args.isolate else run_job(job)
            results.append(result)
            print(f"{result['tokens_per_s']:,.0f} tokens/s, loss {result['loss_final']:.4f}, "
                  f"peak +{_mib(result['peak_added'])}, {result['wall_s']:.0f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not args.smoke:  # the peak again, after the runs: the best of both is the less disturbed one
        for d in ("bf16", "fp32"):
            peaks[d] = max(peaks[d], matmul_peak(args.matmul_n, d, repeats))
    init = {r["fingerprint"] for r in results if r["regime"] == "pretrain"}
    same_init = "yes" if len(init) == 1 else ("n/a" if not init else f"NO ({sorted(init)})")
    versions = []
    for module in ("torch", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    meta = dict(cpu=_cpu_name(), threads=torch.get_num_threads(), capability=torch.backends.cpu.get_cpu_capability(),
                bf16=_bf16_support(), load_start=load_start, load_end=_load_average(), versions=", ".join(versions),
                seed=args.seed, same_init=same_init, n_blocks=n_blocks, rounds=args.rounds, ft_steps=args.ft_steps,
                ft_warmup=args.ft_warmup, ft_rounds=args.ft_rounds, isolate=args.isolate, matmul_n=args.matmul_n,
                matmul_repeats=repeats, notes=notes)
    if any(r["compile"] and not r["compiled_graphs"] for r in results if r["side"] == "ftk"):
        notes.append("the plan said compile=True, but ftk.train.run compiled no graph: those ftk rows ran eagerly")
    meta["plan_compile"] = next((r["plan_compile"] for r in results if r["regime"] == "pretrain"
                                 and r["side"] == "ftk"), False)
    text, key = summarise(results, shape, peaks, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(text)
    (args.out / "bench.json").write_text(json.dumps(
        {"meta": meta, "shape": asdict(shape), "matmul_peak_gflops": peaks, "flops": flop_terms(shape),
         "runs": results}, indent=1))
    print()
    print(text, end="")
    print(f"\nwritten: {args.out / 'bench.md'}, {args.out / 'bench.json'}")
    return 0


def _bf16_support() -> str:
    try:
        from ftk.hardware import cpu_has_bf16

        return "yes (AVX-512 BF16 or AMX)" if cpu_has_bf16() else "no (bf16 is emulated)"
    except Exception:  # noqa: BLE001 - only informative
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
