"""The first run on a GPU server: every path ftk's users take, one row each, in under 10 minutes.

    python scripts/gpu_check.py                     # CUDA if visible (DDP and FSDP too with 2+ GPUs), else toy size on CPU
    python scripts/gpu_check.py --workdir /tmp/gc   # keep the runs there (default: a temporary folder)

Cases: the default pretrain, the default classification fine-tune with validation, LoRA, QLoRA (when
bitsandbytes is installed), gradual_unfreeze with torch.compile, early stopping, evaluate, merge-adapter,
generate (base + adapter, batched sampling), and
with 2+ GPUs DDP and FSDP over torchrun (`--distributed` runs those as 2 gloo processes on a CPU). Each row:
pass/fail, tokens/s, peak memory against the memory planner's estimate (on CUDA torch's peak allocated bytes,
which is what the planner estimates; reserved in brackets). Ends with `gpu check: N passed, M failed`; the
exit code is 1 when a case failed. On a CPU everything runs at toy size (tests/test_gpu_check.py does so),
so this script keeps working until a GPU is there to run it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

WORDS = ("time people way water words number sound place years thing line right story world answer house "
         "point page letter mother night father school light group country state city tree farm family").split()
CLASSES = ("apple", "river", "stone")


def write_data(root: Path) -> dict:
    """A small corpus with structure, and labelled records whose class word is hidden among others."""
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for d in range(120):
        text = " ".join(f"the {rng.choice(WORDS)} of the {rng.choice(WORDS)} was {rng.choice(WORDS)} ."
                        for _ in range(40))
        (corpus / f"doc{d:03d}.txt").write_text(text + "\n")
    files = {}
    for split, n in (("train", 300), ("dev", 30), ("test", 30)):
        lines = []
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
            label = CLASSES[i % 3]
            words.insert(rng.randint(0, len(words)), label)
            lines.append(json.dumps({"text": " ".join(words), "label": label}))
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return {"corpus": corpus, **files}


@dataclass
class Case:
    name: str
    command: List[str]           # the ftk subcommand and its overrides
    run_dir: Optional[Path] = None
    output: Optional[Path] = None  # what must exist afterwards
    processes: int = 1
    needs: List[str] = field(default_factory=list)  # earlier cases this one reads from


@dataclass
class Row:
    name: str
    status: str                  # pass | fail | skip
    seconds: float = 0.0
    tokens_per_s: Optional[float] = None
    peak: Optional[int] = None
    reserved: Optional[int] = None
    planned: Optional[int] = None
    note: str = ""


def cases(work: Path, data: dict, cuda: bool, gpus: int, distributed: bool) -> List[Case]:
    if cuda:  # the defaults users get, shortened; 300 steps is where torch.compile turns on by itself
        model = []
        hw = ["hardware=auto"]
        pre_steps, steps = 300, 60
    else:     # toy size
        model = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.vocab_size=512",
                 "model.max_position_embeddings=128", "train.seq_len=64"]
        hw = ["hardware=cpu", "hardware.precision=fp32", "hardware.num_threads=2"]
        pre_steps, steps = 8, 4
    quick = ["train.batch_size=8", "train.save_every=0", "train.log_every=4"]
    pre = work / "pretrain" / "final"
    task = [f"data.path={data['train']}", f"data.validation_path={data['dev']}", f"model.name_or_path={pre}"]
    ft = [*hw, *quick, f"train.max_steps={steps}", f"train.eval_every={steps // 2}", *task]
    if not cuda:
        ft.append("train.seq_len=64")
    compile_ = ["hardware.compile=true"] + ([] if cuda else ["hardware.compile_backend=eager"])
    out = [
        Case("pretrain (default)", ["pretrain", *model, *hw, *quick, f"train.max_steps={pre_steps}",
                                    f"data.path={data['corpus']}", "train.eval_every=0"], output=pre),
        Case("finetune classification + validation", ["finetune", *ft], needs=["pretrain (default)"]),
        Case("finetune lora", ["finetune", "regime=lora", *ft], needs=["pretrain (default)"]),
        Case("finetune qlora", ["finetune", "regime=qlora", *ft,
                                *([] if cuda else ["hardware.precision=bf16"])], needs=["pretrain (default)"]),
        Case("gradual_unfreeze + compile", ["finetune", "regime=gradual_unfreeze",
                                            f"regime.unfreeze_every={max(1, steps // 4)}", *ft, *compile_],
             needs=["pretrain (default)"]),
        Case("early stopping", ["finetune", *ft, "train.lr=5e-2", f"train.max_steps={steps * 4}",
                                "train.eval_every=2", "train.early_stopping_patience=2"], needs=["pretrain (default)"]),
        Case("evaluate", ["evaluate", *hw, f"model.name_or_path={work / 'finetune-classification-validation' / 'final'}",
                          f"data.path={data['test']}"], needs=["finetune classification + validation"]),
        Case("merge-adapter", ["merge-adapter", f"adapter_path={work / 'finetune-lora' / 'final'}",
                               f"output_dir={work / 'merged'}"], output=work / "merged",
             needs=["finetune lora"]),
        Case("generate", ["generate", *hw, f"adapter_path={work / 'finetune-lora' / 'final'}",
                          "prompts=[the old man said,it is]", "sampling.samples_per_prompt=2",
                          "sampling.max_new_tokens=16"], needs=["finetune lora"]),
    ]
    if gpus >= 2 or distributed:
        n = max(2, gpus) if cuda else 2
        for strategy in ("ddp", "fsdp"):
            profile = [f"hardware=multi-gpu-{strategy}"] if cuda else [*hw, f"hardware.strategy={strategy}",
                                                                       "hardware.num_threads=1"]
            out.append(Case(f"{strategy.upper()} x{n} finetune", ["finetune", *ft, *profile], processes=n,
                            needs=["pretrain (default)"]))
    for case in out:
        if case.run_dir is None:
            slug = case.name.split(" (")[0].replace(" + ", "-").replace(" ", "-")
            case.run_dir = work / ("pretrain" if case.name.startswith("pretrain") else slug)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: Case, done: dict, timeout: float, in_process: bool = False) -> Row:
    if any(done.get(n) != "pass" for n in case.needs):
        return Row(case.name, "fail", note=f"needs {', '.join(case.needs)}")
    if "regime=qlora" in case.command:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return Row(case.name, "skip", note="bitsandbytes not installed: pip install 'ftk[quant]'")
    launcher = [sys.executable, "-m", "ftk.cli.main"] if case.processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(case.processes), "--master_port",
         str(free_port()), "-m", "ftk.cli.main"]
    args = [*case.command, f"hydra.run.dir={case.run_dir}"]
    start = time.time()
    if in_process and case.processes == 1:
        # On a CPU, in this process as the tests do: torch and transformers are imported once, not per case.
        import contextlib
        import io

        from ftk.cli.main import main as ftk_main

        captured = io.StringIO()
        with contextlib.redirect_stderr(captured):
            code = ftk_main(args)
        stderr = captured.getvalue()
    else:
        try:
            proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Row(case.name, "fail", time.time() - start, note=f"no result in {timeout:.0f}s")
        code, stderr = proc.returncode, proc.stderr
    row = Row(case.name, "pass", time.time() - start)
    summary = case.run_dir / "summary.json"
    if code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        row.status, row.note = "fail", (lines[-1] if lines else f"exit code {code}")[:160]
        return row
    if case.output is not None and not case.output.exists():
        row.status, row.note = "fail", f"{case.output} was not written"
    if summary.exists():
        s = json.loads(summary.read_text())
        row.tokens_per_s, row.peak = s.get("tokens_per_s"), s.get("peak_memory_bytes")
        row.reserved, row.planned = s.get("peak_memory_reserved_bytes"), s.get("planned_memory_bytes")
        if case.command[0] in ("pretrain", "finetune") and not (case.run_dir / "final").exists():
            row.status, row.note = "fail", "no final/"
        if "early_stopping_patience=2" in " ".join(case.command) and not s.get("stopped_early"):
            row.note = "ran to the end without stopping early"
    return row


def mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def print_rows(rows: List[Row], device: str) -> None:
    print(f"\n{'case':38} {'result':6} {'time':>6} {'tokens/s':>10} {'peak MiB':>14} {'planned MiB':>11} "
          f"{'peak/plan':>9}  note   ({device})")
    for r in rows:
        ratio = f"{r.peak / r.planned:.2f}" if r.peak and r.planned else "-"
        peak = mib(r.peak) + (f" ({mib(r.reserved)})" if r.reserved else "")
        tps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
        print(f"{r.name:38} {r.status:6} {r.seconds:5.0f}s {tps:>10} {peak:>14} {mib(r.planned):>11} {ratio:>9}  "
              f"{r.note}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--distributed", action="store_true", help="on a CPU, also DDP and FSDP on 2 processes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    args = parser.parse_args(argv)
    import torch

    cuda, gpus = torch.cuda.is_available(), torch.cuda.device_count()
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if cuda else "CPU, toy size"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ftk-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FTK_CACHE", str(work / "cache"))  # nothing is read from or left in ~/.cache/ftk
    data = write_data(work / "data")
    rows, done = [], {}
    for case in cases(work, data, cuda, gpus, args.distributed):
        row = run_case(case, done, args.timeout, in_process=not cuda)
        done[case.name] = row.status
        rows.append(row)
        print(f"{row.name}: {row.status} ({row.seconds:.0f}s){' - ' + row.note if row.note else ''}", flush=True)
    print_rows(rows, device)
    passed = sum(r.status == "pass" for r in rows)
    failed = sum(r.status == "fail" for r in rows)
    print(f"gpu check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
