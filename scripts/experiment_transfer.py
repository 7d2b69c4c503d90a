#!/usr/bin/env python
"""The paradigm, measured: does pretraining make fine-tuning data-efficient, and what does each regime cost?

    python scripts/experiment_transfer.py --quick            # < 10 minutes: every stage, half-width models
    python scripts/experiment_transfer.py                    # ~90 minutes of a 2-core CPU: the report
    python scripts/experiment_transfer.py --out DIR --data ../shared/data --jobs 2

One command, every step through the real `ftk` CLI (each run's folder is kept under --out/runs):

1. data: the last 15% of each Gutenberg book is held out of pretraining; 40-word passages from those
   tails make a book-attribution task (train / dev / test from disjoint stretches of the tail). SST-2 and
   TREC (coarse, 6 classes; dev held out of train) become jsonl.
2. pretraining: a GPT (`+recipe=gpt-tiny`, causal LM) and a BERT (`+recipe=bert-tiny`, masked LM) on the
   books' first 85%, each for a fixed time budget; held-out perplexity on the tails.
3. learning-rate search: full fine-tuning on SST-2 dev at one label budget, per model and per arm
   (pretrained / random initialisation), the same grid for both arms; the winner is used everywhere.
4. task-adaptive pretraining (Gururangan et al. 2020): for the tasks outside the books' domain (SST-2,
   TREC), each model whose learning curve is measured there continues its pretraining objective
   (`ftk finetune objective=clm|mlm regime=full`) on ALL the task's training texts without their labels
   (dev texts validate it; no test text is read), for a fraction of its pretraining steps.
5. data efficiency: full fine-tuning on SST-2, TREC and the book task at several label budgets, from the
   pretrained model, from the same architecture and tokenizer re-initialised (`model.random_init=true`)
   and (SST-2, TREC) from the task-adapted model, several seeds each (`data.train_examples` draws a seeded,
   class-stratified, nested sample); test accuracy.
6. regimes: every regime on SST-2 at one budget with the GPT: trainable parameters, peak memory, wall
   time, test accuracy, forgetting (perplexity change on WikiText-2 valid).
7. forgetting: full fine-tuning for many steps at a high and a low learning rate; the high rate with early
   stopping, with replay of pretraining text, and with L2-SP.
8. in-context learning: the pretrained GPT 0/1/8-shot on SST-2 test against its fine-tuned accuracy.

Output under --out: report.md (every number with its seed count: mean and standard deviation), and
curves.png (accuracy vs labels) and regimes.png (accuracy vs forgetting). Finished runs are reused, so an
interrupted experiment continues where it stopped when run again with the same --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sst2 import to_jsonl  # scripts/sst2.py (a script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
REGIMES = ("full", "feature_extraction", "lora", "qlora", "prompt_tuning", "freeze_layers", "gradual_unfreeze",
           "head_then_full")
PASSAGE_WORDS = 40
SAMPLE_WORDS = 1500  # words of each held-out tail in the pretraining-domain perplexity sample
ADAPTED_TASKS = ("sst2", "trec")  # far from the 19th-century books: the tasks task-adaptive pretraining is for
ARMS = ("pretrained", "scratch", "adapted")


@dataclass
class Mode:
    """How much of everything: the full run and --quick differ only here."""

    pretrain_steps: Dict[str, int]        # a token budget (steps x batch x length), not a time budget: the
                                          # same model whatever else the machine is doing
    pretrain_minutes: Dict[str, float]    # a safety cap only (about 2x what the steps take on a quiet machine)
    seeds: int
    budgets: Dict[str, List[Optional[int]]]   # labels per task (None = all); the book task counts per class
    curve_models: Dict[str, List[str]]       # task -> models whose learning curve is measured
    lr_grid: List[float]
    lr_budget: int                           # SST-2 labels the learning rate is chosen at
    regime_budget: int
    regime_steps: int
    regime_seeds: int
    forgetting_steps: int
    forgetting_lrs: Dict[str, float]
    icl_test: int
    step_cap: int = 300                      # fine-tuning steps at most (see steps_for)
    forgetting_blocks: int = 64              # WikiText-2 blocks of 128 tokens the forgetting ratio is read on
    replay_words: Optional[int] = None       # replay from this many words of each book's pretraining text
                                             # (None: all of it; tokenizing 8.8 MB costs a minute per run)
    pretrain_extra: Dict[str, List[str]] = field(default_factory=dict)  # overrides of a model's pretraining recipe
    eval_cap: Dict[str, int] = field(default_factory=dict)  # SST-2 / TREC examples at most per split (dev, test)
    scaled_phases: bool = False              # gradual_unfreeze / head_then_full phases scaled to regime_steps
                                             # (their defaults, 50 and 100 steps, outlast a short run)
    regime_lrs: Dict[str, float] = field(default_factory=dict)  # a regime's lr instead of its default
    # task-adaptive pretraining: steps per model (a fraction of its pretraining steps), at this share of its
    # pretraining peak rate (continued pretraining starts from trained weights: Gururangan et al. continue
    # RoBERTa at 1e-4, a sixth of its peak), with its pretraining batch and length
    adapt_steps: Dict[str, int] = field(default_factory=dict)
    adapt_lr_ratio: float = 0.5
    name: str = "full run"


FULL = Mode(pretrain_steps={"gpt": 900, "bert": 1500}, pretrain_minutes={"gpt": 60, "bert": 60}, seeds=3,
            budgets={"books": [5, 10, 20], "sst2": [50, 200, 1000, None], "trec": [50, 200, 1000, None]},
            curve_models={"books": ["bert", "gpt"], "sst2": ["bert"], "trec": ["bert"]},
            lr_grid=[1e-4, 3e-4, 1e-3], lr_budget=200, regime_budget=1000, regime_steps=150, regime_seeds=2,
            forgetting_steps=300, forgetting_lrs={"high": 1e-3, "low": 1e-4}, icl_test=300,
            adapt_steps={"gpt": 300, "bert": 500})
# Ten minutes cannot pretrain gpt-tiny far enough for transfer to show (70 steps: held-out perplexity 414, books
# pretrained vs scratch +3 within noise); half the width (1.9M parameters, 1.1M of them the embeddings) reads
# twice the tokens per second, on small batches (more updates) at a higher rate: perplexity 306 after 700 steps,
# and a clear in-domain gain for the BERT.
# The masked LM wants the lower rate: at 3e-3 it stays on the unigram plateau (loss 6.5, every position the same
# representation, fine-tuning from it at chance); at 1e-3 it leaves it after about 600 steps.
SMALL = ["model.hidden_size=128", "model.num_heads=2", "train.seq_len=128", "train.batch_size=8",
         "train.warmup_steps=20"]
QUICK = Mode(pretrain_steps={"gpt": 700, "bert": 750}, pretrain_minutes={"gpt": 6, "bert": 6}, seeds=2,
             budgets={"books": [5, 20], "sst2": [1000], "trec": [1000]},
             curve_models={"books": ["bert", "gpt"], "sst2": ["bert"], "trec": ["bert"]},
             lr_grid=[1e-3], lr_budget=200, regime_budget=1000, regime_steps=120, regime_seeds=1,
             forgetting_steps=60, forgetting_lrs={"high": 1e-3, "low": 1e-4}, icl_test=250, step_cap=120,
             forgetting_blocks=16, replay_words=4000, eval_cap={"dev": 100, "test": 500},
             pretrain_extra={"gpt": SMALL + ["train.lr=3e-3"], "bert": SMALL + ["train.lr=1e-3"]},
             # 120 steps at 1e-4 leave a 1.9M model at chance whatever the regime
             scaled_phases=True, regime_lrs={r: 1e-3 for r in ("full", "freeze_layers", "gradual_unfreeze")},
             adapt_steps={"gpt": 250, "bert": 250}, name="--quick")
# The wiring on made-up data in about two minutes (tests/test_experiment_transfer.py); its numbers mean nothing.
# Its TREC curve is the GPT's, so that task-adaptive pretraining runs both objectives (mlm on SST-2, clm on TREC).
SMOKE = Mode(pretrain_steps={"gpt": 4, "bert": 4}, pretrain_minutes={"gpt": 2, "bert": 2}, seeds=2,
             budgets={"books": [2], "sst2": [8], "trec": [None]},
             curve_models={"books": ["bert", "gpt"], "sst2": ["bert"], "trec": ["gpt"]},
             lr_grid=[1e-3, 3e-4], lr_budget=8, regime_budget=8, regime_steps=2, regime_seeds=1,
             forgetting_steps=4, forgetting_lrs={"high": 1e-3, "low": 1e-4}, icl_test=4, step_cap=2,
             # 20 dev texts: enough tokens for one validation block of task-adaptive pretraining
             pretrain_extra={"gpt": SMALL + ["train.lr=3e-3"]}, eval_cap={"dev": 20, "test": 10}, scaled_phases=True,
             regime_lrs={"full": 1e-3}, adapt_steps={"gpt": 2, "bert": 2}, name="--smoke")


def steps_for(labels: int, mode: Mode) -> int:
    """About 8 epochs for small budgets, capped for large ones (compute), at least 60 updates (full run)."""
    return min(mode.step_cap, max(60, round(8 * labels / 16)) if mode is FULL else max(40, round(8 * labels / 48)))


# ----------------------------------------------------------------------------------------------- data

def prepare_data(data: Path, out: Path, mode: Mode) -> Dict[str, Dict[str, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    tasks = {"books": book_task(data / "gutenberg", out, max(mode.budgets["books"])),
             "sst2": {split: to_jsonl(data / "sst2" / f"stsa.binary.{name}", out / f"sst2-{split}.jsonl")
                      for split, name in (("train", "train"), ("dev", "dev"), ("test", "test"))},
             "trec": trec_task(data / "trec", out)}
    for name in ("sst2", "trec"):
        for split, n in mode.eval_cap.items():
            cap(tasks[name][split], n)
    return tasks


def cap(path: Path, n: int) -> None:
    """Keep a seeded sample of n lines (in file order): evaluation is a quick run's largest fixed cost."""
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) > n:
        keep = sorted(random.Random(0).sample(range(len(lines)), n))
        path.write_text("".join(lines[i] for i in keep))


def book_task(books: Path, out: Path, max_per_class: int) -> Dict[str, Path]:
    """Pretraining text = each book's first 85%; the rest is held out and cut into 40-word passages.
    A tail's first half gives training passages, the next 15% dev, the last 35% test (disjoint stretches)."""
    pretrain, heldout = out / "pretrain", out / "heldout"
    pretrain.mkdir(parents=True, exist_ok=True)
    heldout.mkdir(exist_ok=True)
    splits: Dict[str, list] = {"train": [], "dev": [], "test": []}
    skipped, sample = [], []
    for book in sorted(books.glob("*.txt")):
        text = book.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        cut = text.rfind("\n", 0, int(len(text) * 0.85))
        (pretrain / book.name).write_text(text[:cut])
        (heldout / book.name).write_text(text[cut:])
        words = text[cut:].split()
        sample.append(" ".join(words[:SAMPLE_WORDS]))
        passages = [" ".join(words[i:i + PASSAGE_WORDS]) for i in range(0, len(words) - PASSAGE_WORDS + 1,
                                                                          PASSAGE_WORDS)]
        a, b = len(passages) // 2, int(len(passages) * 0.65)
        if a < max_per_class or len(passages) - b < 10:
            skipped.append(book.stem)  # too short a tail for the largest label budget: kept in pretraining only
            continue
        splits["train"] += [(p, book.stem) for p in passages[:a]]
        splits["dev"] += [(p, book.stem) for p in passages[a:b][:8]]
        splits["test"] += [(p, book.stem) for p in passages[b:][:20]]
    paths = {}
    for split, records in splits.items():
        if split == "train":  # balanced pool: the label budget is per class, the sample stratified
            by_book: Dict[str, list] = {}
            for r in records:
                by_book.setdefault(r[1], []).append(r)
            records = [r for rs in by_book.values() for r in rs[:max_per_class * 2]]
        paths[split] = write_jsonl(out / f"books-{split}.jsonl", records)
    paths["pretrain"], paths["heldout"] = pretrain, heldout
    paths["sample"] = out / "heldout-sample.txt"  # the start of every book's held-out tail: pretraining's domain
    paths["sample"].write_text("\n\n".join(sample))
    (out / "books-skipped.json").write_text(json.dumps(skipped))
    return paths


def trec_task(trec: Path, out: Path) -> Dict[str, Path]:
    def read(path: Path):
        rows = []
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            label, _, text = line.partition(" ")
            if text.strip():
                rows.append((text.strip(), label.split(":")[0]))  # coarse class: ABBR DESC ENTY HUM LOC NUM
        return rows

    train = read(trec / "train.txt")
    rng = random.Random(0)
    rng.shuffle(train)
    dev, train = train[:500], train[500:]
    return {"train": write_jsonl(out / "trec-train.jsonl", train), "dev": write_jsonl(out / "trec-dev.jsonl", dev),
            "test": write_jsonl(out / "trec-test.jsonl", read(trec / "test.txt"))}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in records))
    return path


def count(path: Path) -> int:
    return sum(1 for _ in path.open())


# ----------------------------------------------------------------------------------------------- runs

class Runner:
    """Runs `ftk` commands (in parallel when --jobs > 1, one CPU thread each), skipping finished ones."""

    def __init__(self, jobs: int, log: Path):
        self.jobs, self.log = jobs, log
        self.reused = 0  # finished runs of an earlier invocation, not run again (nor timed) by this one
        log.mkdir(parents=True, exist_ok=True)

    def ftk(self, name: str, done, *args: str) -> None:
        """`done`: the file (or files: every seed of a sweep) a finished run leaves."""
        if all(path.exists() for path in ([done] if isinstance(done, Path) else done)):
            self.reused += 1
            return
        threads = ["hardware.num_threads=1"] if self.jobs > 1 and args[0] in ("pretrain", "finetune", "evaluate") else []
        multirun = ["-m"] if "-m" in args else []  # Hydra reads the flag only before the overrides
        cmd = [sys.executable, "-m", "ftk.cli.main", args[0], *multirun, *(a for a in args[1:] if a != "-m"), *threads]
        started = time.time()
        with open(self.log / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        tag = "ok" if code == 0 else f"FAILED (exit {code}, see {self.log / (name + '.log')})"
        print(f"  {name}: {time.time() - started:.0f}s {tag}", flush=True)
        if code != 0:
            raise SystemExit(f"experiment stopped: `ftk {' '.join(args)}` failed; its output is in "
                             f"{self.log / (name + '.log')}")

    def all(self, calls: Sequence[tuple]) -> None:
        if self.jobs == 1:
            for call in calls:
                self.ftk(*call)
            return
        with ThreadPoolExecutor(self.jobs) as pool:
            for future in [pool.submit(self.ftk, *call) for call in calls]:
                future.result()


def seeds_sweep(seeds: int) -> List[str]:
    """One process per configuration, one Hydra job per seed (start-up paid once)."""
    return ["-m", "train.seed=" + ",".join(str(s) for s in range(seeds)), "hydra.sweep.subdir=seed${train.seed}"]


def seeds_done(sweep: Path, seeds: int) -> List[Path]:
    """Every seed's summary: Hydra goes on to the next seed when one is stopped (a SIGTERM from outside, say), so
    the last seed's summary alone does not mean the sweep finished."""
    return [sweep / f"seed{s}" / "summary.json" for s in range(seeds)]


def summaries(sweep: Path, seeds: int) -> List[dict]:
    return [json.loads((sweep / f"seed{s}" / "summary.json").read_text()) for s in range(seeds)]


def classify(task: Dict[str, Path], base: Path, *extra: str, seq_len: int = 128) -> List[str]:
    return ["finetune", "objective=classification", f"model.name_or_path={base}", f"data.path={task['train']}",
            f"data.validation_path={task['dev']}", f"data.test_path={task['test']}", f"train.seq_len={seq_len}",
            "train.batch_size=16", "train.save_every=0", "train.eval_every=0", "train.warmup_steps=10", *extra]


# ----------------------------------------------------------------------------------------------- stages

def pretrain(runner: Runner, out: Path, books: Dict[str, Path], mode: Mode) -> Dict[str, Path]:
    """Both models at once, one thread each (with --jobs 2): on 2 cores two single-threaded small models
    use the machine better than one after the other on two threads, and degrade gracefully when shared."""
    calls, finals = [], {}
    for model, recipe in (("gpt", "gpt-tiny"), ("bert", "bert-tiny")):
        run = out / "runs" / f"pretrain-{model}"
        calls.append((f"pretrain-{model}", run / "summary.json", "pretrain", f"+recipe={recipe}",
                      f"data.path={books['pretrain']}", f"data.validation_path={books['heldout']}",
                      f"train.max_steps={mode.pretrain_steps[model]}",
                      f"train.max_minutes={mode.pretrain_minutes[model]}",
                      f"train.eval_every={max(25, mode.pretrain_steps[model] // 8)}", "train.eval_batches=25",
                      "train.save_every=0", *mode.pretrain_extra.get(model, []), f"hydra.run.dir={run}"))
        finals[model] = run / "final"
    runner.all(calls)
    return finals


def lr_search(runner: Runner, out: Path, tasks, bases, mode: Mode) -> Dict[str, float]:
    """The learning rate of each (model, arm): best SST-2 dev accuracy at one budget, seed 0, same grid."""
    calls, where = [], {}
    models = sorted({m for ms in mode.curve_models.values() for m in ms})
    for model in models:
        for arm in ("pretrained", "scratch"):
            for lr in mode.lr_grid:
                sweep = out / "runs" / "lr-search" / f"{model}-{arm}-lr{lr:g}"
                where[(model, arm, lr)] = sweep
                calls.append((f"lr-{model}-{arm}-{lr:g}", sweep / "seed0" / "summary.json",
                              *classify(tasks["sst2"], bases[model], "regime=full", f"train.lr={lr}",
                                        f"model.random_init={arm == 'scratch'}",
                                        f"data.train_examples={mode.lr_budget}",
                                        f"train.max_steps={steps_for(mode.lr_budget, mode)}"),
                              *seeds_sweep(1), f"hydra.sweep.dir={sweep}"))
    if len(mode.lr_grid) > 1:
        runner.all(calls)
    chosen, rows = {}, []
    for model in models:
        for arm in ("pretrained", "scratch"):
            if len(mode.lr_grid) == 1:
                chosen[f"{model}-{arm}"] = mode.lr_grid[0]
                continue
            dev = {lr: summaries(where[(model, arm, lr)], 1)[0]["final_eval_accuracy"] for lr in mode.lr_grid}
            chosen[f"{model}-{arm}"] = max(dev, key=dev.get)
            rows.append((model, arm, dev))
    return chosen, rows


def task_texts(task: Dict[str, Path], split: str) -> Path:
    """A split's texts without their labels, one document each (jsonl: ftk packs them with the model's
    separator between texts, as in pretraining; a .txt file would be one document)."""
    path = task[split].with_name(task[split].stem + "-texts.jsonl")
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in task[split].open()))
    return path


def adapted_pairs(mode: Mode) -> List[tuple]:
    """(task, model) of every learning curve outside the pretraining domain: what gets adapted."""
    return [(task, model) for task in ADAPTED_TASKS for model in mode.curve_models.get(task, [])]


def adapt(runner: Runner, out: Path, tasks, bases, mode: Mode) -> Dict[tuple, Path]:
    """Task-adaptive pretraining: each model continues its own pretraining objective on all of a task's
    training texts (unlabelled; the labelled budgets are samples of them), validated on the task's dev texts,
    with its pretraining batch and length, at `adapt_lr_ratio` of its pretraining rate. The tokenizer is the
    pretrained model's own (ftk loads it from model.name_or_path)."""
    from omegaconf import OmegaConf

    calls, where = [], {}
    for task, model in adapted_pairs(mode):
        pretrained = OmegaConf.load(bases[model].parent / ".hydra" / "config.yaml").train
        steps = mode.adapt_steps[model]
        run = out / "runs" / "adapt" / f"{task}-{model}"
        where[(task, model)] = run
        calls.append((f"adapt-{task}-{model}", run / "summary.json", "finetune",
                      f"objective={'clm' if model == 'gpt' else 'mlm'}", "regime=full",
                      f"model.name_or_path={bases[model]}", f"data.path={task_texts(tasks[task], 'train')}",
                      f"data.validation_path={task_texts(tasks[task], 'dev')}", f"train.max_steps={steps}",
                      f"train.lr={pretrained.lr * mode.adapt_lr_ratio:g}", f"train.batch_size={pretrained.batch_size}",
                      f"train.seq_len={pretrained.seq_len}", f"train.beta2={pretrained.beta2}",
                      f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={max(1, steps // 4)}",
                      "train.save_every=0", f"hydra.run.dir={run}"))
    runner.all(calls)
    return {pair: run / "final" for pair, run in where.items()}


def data_efficiency(runner: Runner, out: Path, tasks, bases, lrs, mode: Mode, adapted: Dict[tuple, Path]) -> dict:
    """Each curve point from the pretrained model, from random initialisation and (tasks outside the books'
    domain) from the task-adapted model; the adapted arm at the pretrained arm's learning rate."""
    calls, cells = [], {}
    classes = {name: len({json.loads(line)["label"] for line in paths["train"].open()})
               for name, paths in tasks.items()}
    for task, models in mode.curve_models.items():
        for model in models:
            for budget in mode.budgets[task]:
                labels = budget * classes[task] if task == "books" and budget else budget
                n = labels or count(tasks[task]["train"])
                for arm in ARMS:
                    if arm == "adapted" and (task, model) not in adapted:
                        continue
                    base = adapted[(task, model)] if arm == "adapted" else bases[model]
                    lr = lrs[f"{model}-{'scratch' if arm == 'scratch' else 'pretrained'}"]
                    sweep = out / "runs" / "curves" / f"{task}-{model}-{arm}-n{labels or 'all'}"
                    cells[(task, model, budget, arm)] = sweep
                    calls.append((f"curve-{task}-{model}-{arm}-n{labels or 'all'}",
                                  seeds_done(sweep, mode.seeds),
                                  *classify(tasks[task], base, "regime=full", f"train.lr={lr}",
                                            f"model.random_init={arm == 'scratch'}",
                                            f"data.train_examples={labels if labels else 'null'}",
                                            f"train.max_steps={steps_for(n, mode)}"),
                                  *seeds_sweep(mode.seeds), f"hydra.sweep.dir={sweep}"))
    runner.all(calls)
    return {key: [s["test_accuracy"] for s in summaries(sweep, mode.seeds)] for key, sweep in cells.items()}


def regimes(runner: Runner, out: Path, tasks, bases, wikitext: Path, mode: Mode) -> Dict[str, List[dict]]:
    calls, where = [], {}
    # a third of the steps on the head alone; the 4 blocks and the embeddings all unfrozen by the last sixth
    # (each only where the regime has it: a key of another regime is refused)
    phases = {"head_then_full": [f"regime.head_steps={max(1, mode.regime_steps // 3)}"],
              "gradual_unfreeze": [f"regime.unfreeze_every={max(1, mode.regime_steps // 6)}"]} \
        if mode.scaled_phases else {}
    for i, regime in enumerate(REGIMES):
        sweep = out / "runs" / "regimes" / f"{i}-{regime}"
        where[regime] = sweep
        calls.append((f"regime-{regime}", seeds_done(sweep, mode.regime_seeds),
                      *classify(tasks["sst2"], bases["gpt"], f"regime={regime}", *phases.get(regime, ()),
                                *([f"train.lr={mode.regime_lrs[regime]}"] if regime in mode.regime_lrs else []),
                                f"data.train_examples={mode.regime_budget}", f"train.max_steps={mode.regime_steps}",
                                f"forgetting.data_path={wikitext}", f"forgetting.max_blocks={mode.forgetting_blocks}"),
                      *seeds_sweep(mode.regime_seeds), f"hydra.sweep.dir={sweep}"))
    runner.all(calls)
    return {regime: summaries(sweep, mode.regime_seeds) for regime, sweep in where.items()}


def replay_text(pretrain: Path, mode: Mode) -> Path:
    """The pretraining text replayed during fine-tuning: all of it, or the start of every book's share."""
    if mode.replay_words is None:
        return pretrain
    sample = pretrain.parent / "replay-sample.txt"
    sample.write_text("\n\n".join(" ".join(book.read_text().split()[:mode.replay_words])
                                   for book in sorted(pretrain.glob("*.txt"))))
    return sample


def forgetting(runner: Runner, out: Path, tasks, bases, wikitext: Path, mode: Mode) -> Dict[str, dict]:
    high, low = mode.forgetting_lrs["high"], mode.forgetting_lrs["low"]
    every = max(10, mode.forgetting_steps // 8)
    variants = {
        f"full, lr {high:g}": [f"train.lr={high}"],
        f"full, lr {low:g}": [f"train.lr={low}"],
        f"lr {high:g} + early stopping": [f"train.lr={high}", f"train.eval_every={every}",
                                          "train.early_stopping_patience=2"],
        f"lr {high:g} + replay 25%": [f"train.lr={high}", "forgetting.replay_fraction=0.25",
                                      f"forgetting.replay_path={replay_text(tasks['books']['pretrain'], mode)}"],
        f"lr {high:g} + L2-SP": [f"train.lr={high}", "forgetting.l2sp=1.0"],
    }
    calls, where = [], {}
    for i, (name, extra) in enumerate(variants.items()):
        run = out / "runs" / "forgetting" / f"{i}"
        where[name] = run
        calls.append((f"forgetting-{i}", run / "summary.json",
                      *classify(tasks["sst2"], bases["gpt"], "regime=full", f"data.train_examples={mode.regime_budget}",
                                f"train.max_steps={mode.forgetting_steps}", f"forgetting.data_path={wikitext}",
                                f"forgetting.max_blocks={mode.forgetting_blocks}", *extra), f"hydra.run.dir={run}"))
    runner.all(calls)
    return {name: json.loads((run / "summary.json").read_text()) for name, run in where.items()}


def evaluations(runner: Runner, out: Path, tasks, bases, forget: Dict[str, dict], mode: Mode) -> tuple:
    """Two evaluate processes side by side: perplexity on held-out passages of the pretraining books (the
    knowledge pretraining put in) for the pretrained GPT and each forgetting run (a classifier read through the
    base's LM head on its body), and in-context learning of the pretrained GPT on SST-2 test."""
    models = {"pretrained": bases["gpt"], **{name: Path(s["final_dir"]) for name, s in forget.items()}}
    ppl, icl = out / "runs" / "books-ppl", out / "runs" / "icl-gpt-sst2"
    runner.all([
        # one process, one Hydra job per model (start-up paid once); job k reads the k-th model
        ("books-ppl", ppl / str(len(models) - 1) / "metrics.json", "evaluate", "-m",
         "model.name_or_path=" + ",".join(str(m) for m in models.values()), "eval=perplexity",
         f"data.path={tasks['books']['sample']}", "eval.context=256", "eval.stride=256", f"hydra.sweep.dir={ppl}",
         "hydra.sweep.subdir=${hydra.job.num}"),
        ("icl-gpt-sst2", icl / "metrics.json", "evaluate", f"model.name_or_path={bases['gpt']}", "eval=icl",
         "eval.shots=0,1,8", f"eval.num_test={mode.icl_test}", f"data.path={tasks['sst2']['train']}",
         f"data.validation_path={tasks['sst2']['test']}", "eval.context=256", f"hydra.run.dir={icl}")])
    books_ppl = {name: json.loads((ppl / str(k) / "metrics.json").read_text())["causal"]["perplexity"]
                 for k, name in enumerate(models)}
    return books_ppl, json.loads((icl / "metrics.json").read_text())["icl"]


# ----------------------------------------------------------------------------------------------- report

def mean_sd(values: Sequence[float]) -> tuple:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, sd


def pm(values: Sequence[float], pct: bool = True) -> str:
    """Mean ± standard deviation (n seeds): percent with one decimal, or a ratio with two and an x."""
    m, sd = mean_sd(values)
    scale, digits, unit = (100, 1, "") if pct else (1, 2, "x")
    spread = "" if math.isnan(sd) else f" ± {sd * scale:.{digits}f}"
    return f"{m * scale:.{digits}f}{unit}{spread} (n={len(values)})"


def verdict(pre: Sequence[float], scratch: Sequence[float]) -> str:
    """Difference of means with its standard error; 'clear' when it exceeds two standard errors."""
    (m1, s1), (m2, s2) = mean_sd(pre), mean_sd(scratch)
    if len(pre) < 2:
        return f"{(m1 - m2) * 100:+.1f} (1 seed: no interval)"
    se = math.sqrt(s1 ** 2 / len(pre) + s2 ** 2 / len(scratch))
    word = "clear" if abs(m1 - m2) > 2 * se else "within noise"
    return f"{(m1 - m2) * 100:+.1f} ± {se * 100:.1f} ({word})"


def report(out: Path, mode: Mode, pre_runs, lr_rows, lrs, curves, regime_runs, forget, books_ppl, icl_result,
           tasks, minutes: float, reused: int = 0, adapted: Optional[Dict[tuple, Path]] = None) -> str:
    flag = "" if mode is FULL else f" {mode.name}"
    lines = [f"# Transfer experiment ({mode.name})", "",
             f"`python scripts/experiment_transfer.py{flag} --out {out}`; "
             f"{minutes:.1f} minutes on this machine" + (f" for this invocation, which reused {reused} finished runs of "
                                                          "earlier ones" if reused else "")
             + ". Accuracies in percent, mean ± standard deviation over n seeds.",
             ""]
    lines += ["## Pretraining (Gutenberg, last 15% of every book held out)", "",
              "| model | objective | parameters | steps | tokens | minutes | held-out loss | held-out perplexity |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, run in pre_runs.items():
        s = json.loads((run.parent / "summary.json").read_text())
        lines.append(f"| {model} | {'causal LM' if model == 'gpt' else 'masked LM'} | {s['parameters'] / 1e6:.2f}M | "
                     f"{s['steps']:,} | {s['tokens_seen']:,} | {s['train_time_s'] / 60:.1f} | "
                     f"{s['final_eval_loss']:.3f} | {s['final_eval_ppl']:.1f} |")
    lines += ["", "(BERT's perplexity is over masked tokens only, GPT's over every next token: not comparable.)", ""]
    # the time cap is a safety net sized for a quiet machine: on a busy one it cuts pretraining short, and every
    # number downstream is then that of a less-trained model (and not reproducible: the cut depends on the load)
    done_steps = {model: json.loads((run.parent / "summary.json").read_text())["steps"]
                  for model, run in pre_runs.items()}
    short = [f"{model} {n:,} of {mode.pretrain_steps[model]:,} steps" for model, n in done_steps.items()
             if n < mode.pretrain_steps[model]]
    if short:
        lines += [f"**Pretraining stopped at its time cap ({', '.join(short)}; cap "
                  + ", ".join(f"{m} {v:g} min" for m, v in mode.pretrain_minutes.items())
                  + "): the machine was slower than the cap allows for, so every result below is that of less-trained "
                  "models than this mode's, and depends on the machine's load (not reproducible).**", ""]
    if mode.pretrain_extra:
        lines += ["Pretraining overrides of this mode: " + "; ".join(
            f"{model}: `{' '.join(extra)}`" for model, extra in mode.pretrain_extra.items()) + ".", ""]
    if lr_rows:
        grid = [f"{lr:g}" for lr in mode.lr_grid]
        lines += [f"## Learning rate (full fine-tuning, SST-2 dev accuracy at {mode.lr_budget} labels, seed 0)", "",
                  "| model | arm | " + " | ".join(grid) + " | chosen |", "|---|---|" + "---:|" * (len(grid) + 1)]
        for model, arm, dev in lr_rows:
            lines.append(f"| {model} | {arm} | " + " | ".join(f"{dev[lr] * 100:.1f}" for lr in mode.lr_grid)
                         + f" | {lrs[f'{model}-{arm}']:g} |")
        lines.append("")
    else:
        lines += [f"Learning rate: {mode.lr_grid[0]:g} for both arms ({mode.name} skips the search).", ""]
    skipped = json.loads((out / "data" / "books-skipped.json").read_text())
    lines += ["## Data efficiency: pretrained vs random initialisation vs task-adapted (full fine-tuning, test "
              "accuracy)", "",
              "| task | model | labels | pretrained | scratch | adapted | pretrained - scratch ± s.e. | "
              "adapted - scratch ± s.e. |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    classes = {name: len({json.loads(line)["label"] for line in paths["train"].open()}) for name, paths in tasks.items()}

    def budget_label(task: str, budget: Optional[int]) -> str:
        return ("all" if budget is None else f"{budget * classes[task]} ({budget}/class)" if task == "books"
                else str(budget))

    for task, models in mode.curve_models.items():
        for model in models:
            for budget in mode.budgets[task]:
                pre, scr = curves[(task, model, budget, "pretrained")], curves[(task, model, budget, "scratch")]
                ada = curves.get((task, model, budget, "adapted"))
                lines.append(f"| {task} | {model} | {budget_label(task, budget)} | {pm(pre)} | {pm(scr)} | "
                             f"{pm(ada) if ada else '-'} | {verdict(pre, scr)} | {verdict(ada, scr) if ada else '-'} |")
    size = {name: f"{classes[name]} classes, train {count(paths['train']):,}, dev {count(paths['dev']):,}, test "
                  f"{count(paths['test']):,}" for name, paths in tasks.items()}
    lines += ["", f"Tasks: sst2 ({size['sst2']}), trec (coarse; {size['trec']}), books (which Gutenberg book a "
              f"{PASSAGE_WORDS}-word passage from the held-out tails comes from; {size['books']}; chance "
              f"{100 / classes['books']:.1f}%; too short a tail for the task: {', '.join(skipped) or 'none'}). "
              "Label budgets are seeded, class-stratified, nested samples (data.train_examples). The adapted arm "
              "(tasks outside the books' domain) fine-tunes the task-adapted model (next section) at the pretrained "
              "arm's learning rate.", ""]
    if adapted:
        lines += adaptation_section(mode, adapted, curves, budget_label, tasks)
    rates = "each regime's default learning rate" + (" except " + ", ".join(
        f"{r} {lr:g}" for r, lr in mode.regime_lrs.items()) if mode.regime_lrs else "")
    lines += [f"## Regimes (GPT, SST-2, {mode.regime_budget} labels, {mode.regime_steps} steps, {rates})", "",
              "| regime | trainable | peak RSS | wall time | test accuracy | WikiText-2 perplexity ratio |",
              "|---|---:|---:|---:|---:|---:|"]
    for regime, runs in regime_runs.items():
        first = runs[0]  # one process per regime: its first job's peak is not shared with another regime
        lines.append(f"| {regime} | {first['trainable_parameters']:,} ({first['trainable_share']:.2%}) | "
                     f"{first['peak_memory_bytes'] / 2**20:,.0f} MiB | {mean_sd([r['wall_time_s'] for r in runs])[0]:.0f}s"
                     f" | {pm([r['test_accuracy'] for r in runs])} | "
                     f"{pm([r['forgetting']['ppl_ratio'] for r in runs], pct=False)} |")
    lines += ["", "Peak RSS of each regime's first seed (its own process); wall time includes loading and the "
              "forgetting measurement. Perplexity ratio = fine-tuned / pretrained perplexity on WikiText-2 valid "
              f"({mode.forgetting_blocks} blocks of 128 tokens), read through the base's LM head on the fine-tuned body.", ""]
    lines += [f"## Forgetting and its mitigations (GPT, full fine-tuning, SST-2 {mode.regime_budget} labels, "
              f"{mode.forgetting_steps} steps, 1 seed)", "",
              "| run | steps done | test accuracy | WikiText-2 perplexity | ratio | held-out books perplexity | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in forget.items():
        f = s["forgetting"]
        lines.append(f"| {name} | {s['steps']} | {s['test_accuracy'] * 100:.1f} | {f['base_ppl']:.1f} -> "
                     f"{f['finetuned_ppl']:.1f} | {f['ppl_ratio']:.2f}x | {books_ppl['pretrained']:.1f} -> "
                     f"{books_ppl[name]:.1f} | {books_ppl[name] / books_ppl['pretrained']:.2f}x |")
    wiki = next(iter(forget.values()))["forgetting"]["base_ppl"]
    lines += ["", f"Held-out books: the first {SAMPLE_WORDS:,} words of every book's held-out tail (the pretraining "
              "domain; context 256). WikiText-2 is modern encyclopaedic English, far from the 19th-century books the "
              f"GPT learned: the pretrained GPT's perplexity there ({wiki:.0f}) is {wiki / books_ppl['pretrained']:.0f}x "
              "its perplexity on the held-out books."]
    full_acc = regime_runs["full"]
    lines += ["", "## In-context learning of the pretrained GPT (SST-2 test)", "",
              "| shots | accuracy |", "|---:|---:|"]
    for row in icl_result["rows"]:
        lines.append(f"| {row['shots']} | {row['accuracy'] * 100:.1f} (n={mode.icl_test} examples) |")
    lines += [f"| fine-tuned (full, {mode.regime_budget} labels) | {pm([r['test_accuracy'] for r in full_acc])} |",
              "", f"Majority class: {icl_result['majority'] * 100:.1f}%.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def adaptation_section(mode: Mode, adapted: Dict[tuple, Path], curves, budget_label, tasks) -> List[str]:
    """What task-adaptive pretraining cost (its own run's minutes) beside what it gained at each budget."""
    from omegaconf import OmegaConf

    lines = ["## Task-adaptive pretraining (continued pretraining on the task's unlabelled training texts)", "",
             "| task | model | objective | task texts | steps | epochs | lr | minutes | dev perplexity (task "
             "texts) | adapted - scratch | adapted - pretrained |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for (task, model), final in adapted.items():
        s = json.loads((final.parent / "summary.json").read_text())
        cfg = OmegaConf.load(final.parent / ".hydra" / "config.yaml")
        gains = [(budget_label(task, b), curves[(task, model, b, "adapted")], curves[(task, model, b, "scratch")],
                  curves[(task, model, b, "pretrained")]) for b in mode.budgets[task]]
        lines.append(f"| {task} | {model} | {cfg.objective.name} | {count(tasks[task]['train']):,} | "
                     f"{s['steps']:,} | {s['steps'] * cfg.train.batch_size / s['train_examples']:.1f} | "
                     f"{cfg.train.lr:g} | {s['train_time_s'] / 60:.1f} ({s['wall_time_s'] / 60:.1f}) | "
                     f"{s['final_eval_ppl']:.1f} | "
                     + "; ".join(f"{label}: {verdict(a, scr)}" for label, a, scr, _ in gains) + " | "
                     + "; ".join(f"{label}: {verdict(a, pre)}" for label, a, _, pre in gains) + " |")
    steps = ", ".join(f"{model} {mode.adapt_steps[model]} of {mode.pretrain_steps[model]}"
                      for model in sorted({model for _, model in adapted}))
    lines += ["", f"Every training text of the task, labels dropped (the labelled budgets are samples of the same "
              f"texts; Gururangan et al. 2020's task-adaptive setting), dev texts for validation, no test text. Steps "
              f"(adaptation of pretraining): {steps}; the pretraining batch and length, at {mode.adapt_lr_ratio:g} "
              "of the pretraining peak rate. Epochs: passes over the task's texts packed into blocks. Minutes: the "
              "adaptation's training time (in brackets, its whole run: start-up, packing, validation), paid once per "
              "task and model whatever the label budget.", ""]
    return lines


def plots(out: Path, mode: Mode, curves, regime_runs, tasks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = {name: len({json.loads(line)["label"] for line in paths["train"].open()}) for name, paths in tasks.items()}
    fig, axes = plt.subplots(1, len(mode.curve_models), figsize=(4.2 * len(mode.curve_models), 3.6))
    for ax, (task, models) in zip(axes, mode.curve_models.items()):
        for model in models:
            for arm, style in (("pretrained", "-"), ("scratch", "--"), ("adapted", ":")):
                if (task, model, mode.budgets[task][0], arm) not in curves:
                    continue  # adapted: only the tasks outside the books' domain
                xs, ms, sds = [], [], []
                for budget in mode.budgets[task]:
                    values = curves[(task, model, budget, arm)]
                    m, sd = mean_sd(values)
                    labels = (budget * classes[task] if task == "books" else budget) if budget else \
                        count(tasks[task]["train"])
                    xs.append(labels)
                    ms.append(100 * m)
                    sds.append(0 if math.isnan(sd) else 100 * sd)
                ax.errorbar(xs, ms, yerr=sds, linestyle=style, marker="o", capsize=3, label=f"{model} {arm}")
        ax.axhline(100 / classes[task], color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("training labels")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)  # each panel its own: the adapted arm is only on some
    fig.suptitle(f"Pretrained vs random initialisation vs task-adapted (mean ± sd over {mode.seeds} seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for regime, runs in regime_runs.items():
        acc = mean_sd([r["test_accuracy"] * 100 for r in runs])[0]
        ratio = mean_sd([r["forgetting"]["ppl_ratio"] for r in runs])[0]
        ax.scatter(ratio, acc)
        ax.annotate(regime, (ratio, acc), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("WikiText-2 perplexity, fine-tuned / pretrained (forgetting)")
    ax.set_ylabel("SST-2 test accuracy (%)")
    ax.set_title(f"Regimes: accuracy vs forgetting ({mode.regime_seeds} seed(s))", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "regimes.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with gutenberg/, sst2/, trec/, wikitext-2/")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default bench-out/transfer[-quick])")
    ap.add_argument("--quick", action="store_true",
                    help="every stage with half-width models, under 10 minutes (README: what it can and cannot show)")
    ap.add_argument("--smoke", action="store_true", help="the wiring only, a few steps of everything (tests)")
    ap.add_argument("--jobs", type=int, default=2, help="fine-tuning runs at once (one CPU thread each)")
    args = ap.parse_args()
    mode = SMOKE if args.smoke else QUICK if args.quick else FULL
    out = args.out or REPO / "bench-out" / ("transfer" if mode is FULL else f"transfer-{mode.name[2:]}")
    needed = [args.data / "gutenberg", args.data / "sst2" / "stsa.binary.train", args.data / "trec" / "train.txt",
              args.data / "wikitext-2" / "valid.txt"]
    missing = [p for p in needed if not p.exists()]
    if missing:
        print(f"error: {missing[0]} not found; pass --data DIR holding gutenberg/, sst2/, trec/ and wikitext-2/",
              file=sys.stderr)
        return 2
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.jobs, out / "logs")

    def stage(name: str) -> None:
        print(f"[{(time.time() - started) / 60:5.1f} min] {name}", flush=True)

    stage("data")
    tasks = prepare_data(args.data, out / "data", mode)
    stage("pretraining (GPT causal LM, BERT masked LM)")
    bases = pretrain(runner, out, tasks["books"], mode)
    stage("learning-rate search")
    lrs, lr_rows = lr_search(runner, out, tasks, bases, mode)
    stage(f"task-adaptive pretraining ({', '.join(f'{m} on {t}' for t, m in adapted_pairs(mode))})")
    adapted = adapt(runner, out, tasks, bases, mode)
    stage(f"data efficiency ({', '.join(mode.curve_models)}; {mode.seeds} seeds)")
    curves = data_efficiency(runner, out, tasks, bases, lrs, mode, adapted)
    wikitext = args.data / "wikitext-2" / "valid.txt"
    stage("regimes")
    regime_runs = regimes(runner, out, tasks, bases, wikitext, mode)
    stage("forgetting and mitigations")
    forget = forgetting(runner, out, tasks, bases, wikitext, mode)
    stage("perplexity on the held-out books; in-context learning")
    books_ppl, icl_result = evaluations(runner, out, tasks, bases, forget, mode)
    text = report(out, mode, bases, lr_rows, lrs, curves, regime_runs, forget, books_ppl, icl_result, tasks,
                  (time.time() - started) / 60, runner.reused, adapted)
    plots(out, mode, curves, regime_runs, tasks)
    print(text)
    stage(f"done: {out / 'report.md'}, {out / 'curves.png'}, {out / 'regimes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
