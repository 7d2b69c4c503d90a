"""What every training recipe does first and last: plan the hardware, start accelerate, record the
environment; save final/, write summary.json and print the closing table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ftk import hardware, runs
from ftk.hardware import Plan

ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Session:
    plan: Plan
    accelerator: Any
    say: Callable[[str], None]  # prints on the main process only


def start(cfg: Any, run_dir: Path) -> Session:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own progress display is the one to watch
    hardware.set_threads(cfg.hardware.num_threads)
    plan = hardware.resolve(cfg.hardware, cfg.train.batch_size, cfg.train.max_steps)
    # accelerate keeps one global state per process; a multirun sweep runs several jobs in one process,
    # each with its own precision, so forget the previous job's choice (the process group is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # torch.compile through accelerate: prepare() wraps the model; inductor caches compiled kernels on disk,
    # so a second run of the same shapes compiles much faster. The plan turns it on only where it pays off.
    accelerator = Accelerator(cpu=plan.device == "cpu", mixed_precision=ACCELERATE_PRECISION[plan.precision],
                              dynamo_backend="inductor" if plan.compile else "no")
    set_seed(cfg.train.seed)  # model initialisation; the loop reseeds per step
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)  # paths stay whole, greppable

    def say(text: str) -> None:
        if accelerator.is_main_process:
            console.print(text)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(run_dir / "environment.json", {**runs.environment(), "plan": plan.as_dict()})
    return Session(plan, accelerator, say)


def finish(session: Session, run_dir: Path, model: Any, tokenizer: Any, summary: Dict[str, Any], title: str,
           extra_json: Optional[Dict[str, Dict[str, Any]]] = None,
           extra_rows: Sequence[Tuple[str, str]] = ()) -> None:
    """Write final/ (Hugging Face format, or a PEFT adapter) and the summary; rank 0 only."""
    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    import shutil

    final = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, content in (extra_json or {}).items():
        runs.write_json(tmp / name, content)
    if final.exists():  # a resumed run that finished again: replace the old final/ only now
        shutil.rmtree(final)
    tmp.replace(final)
    summary = {**summary, "final_dir": str(final)}
    runs.write_json(run_dir / "summary.json", summary)
    rows = [
        ("parameters", f"{summary['parameters'] / 1e6:.2f}M" + (
            f" ({summary['trainable_parameters'] / max(1, summary['parameters']):.1%} trainable)"
            if summary["trainable_parameters"] != summary["parameters"] else "")),
        ("steps", f"{summary['steps']:,}"),
        ("tokens seen", f"{summary['tokens_seen']:,}"),
        ("wall time", runs.format_duration(summary["wall_time_s"])),
        ("tokens/s (training)", f"{summary['tokens_per_s']:,.0f}"),
    ]
    if summary.get("first_step_s") is not None:
        rows.append(("command to first step", f"{summary['first_step_s']:.1f}s"))
    if "final_eval_ppl" in summary:
        rows += [("validation loss", f"{summary['final_eval_loss']:.4f}"),
                 ("validation perplexity", f"{summary['final_eval_ppl']:.2f}")]
    if "final_eval_accuracy" in summary:
        rows += [("validation loss", f"{summary['final_eval_loss']:.4f}"),
                 ("validation accuracy", f"{summary['final_eval_accuracy']:.2%}")]
    rows += list(extra_rows)
    rows.append(("saved", str(final)))
    runs.print_summary(f"ftk {title}: {run_dir}", rows)
