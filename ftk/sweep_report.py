"""After a `ftk finetune -m` sweep: one table comparing every run of it (the paradigm's seed table).

A Hydra callback (configs/finetune.yaml, hydra.callbacks.comparison) reads each job's summary.json
and writes <sweep>/comparison.md and comparison.json, and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from hydra.experimental.callback import Callback

COLUMNS = ("run", "regime", "trainable", "peak RSS", "added in training", "wall time", "task metric", "forgetting")


def rows(sweep: Path) -> List[Dict[str, Any]]:
    out = []
    for summary_file in sorted(sweep.rglob("summary.json"), key=lambda p: str(p.parent.relative_to(sweep))):
        s = json.loads(summary_file.read_text())
        if "test_accuracy" in s:
            metric = f"test accuracy {s['test_accuracy']:.2%} (validation {s['final_eval_accuracy']:.2%})"
        elif "final_eval_accuracy" in s:
            metric = f"accuracy {s['final_eval_accuracy']:.2%}"
        elif "final_eval_ppl" in s:
            metric = f"perplexity {s['final_eval_ppl']:.2f}"
        else:
            metric = "-"
        f = s.get("forgetting") or {}
        forgot = (f"ppl {f['base_ppl']:.1f} -> {f['finetuned_ppl']:.1f} ({f['ppl_ratio']:.2f}x)"
                  if f.get("base_ppl") else "none to forget (random init)" if s.get("init") == "random"
                  else "not measured (forgetting.data_path)")
        out.append({
            "run": str(summary_file.parent.relative_to(sweep)), "regime": s.get("regime", "?"),
            "trainable": f"{s['trainable_parameters']:,} ({s['trainable_share']:.2%})" + (
                f" -> {s['trainable_parameters_end']:,} ({s['trainable_parameters_end'] / s['parameters']:.0%})"
                if s.get("trainable_parameters_end", s["trainable_parameters"]) != s["trainable_parameters"] else ""),
            "peak RSS": f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB",
            "added in training": f"{s['peak_memory_added_bytes'] / 2**20:,.0f} MiB",
            "wall time": f"{s['wall_time_s']:.0f}s", "task metric": metric, "forgetting": forgot,
            "summary": s,
        })
    return out


def markdown(table: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines) + "\n"


NOTE = ("peak RSS: the process's peak resident set during training (CUDA: peak allocated); added in training: "
        "above the level at its start. Jobs of one `-m` sweep share a process: later jobs reuse memory earlier ones "
        "freed, so compare 'added' across jobs, or run one process per job (scripts/experiment_finetune_regimes.py).")


def write_comparison(sweep: Path) -> str:
    """comparison.md and comparison.json for every run under `sweep`; returns the markdown."""
    table = rows(sweep)
    text = "# Fine-tuning sweep\n\n" + NOTE + "\n\n" + markdown(table)
    (sweep / "comparison.md").write_text(text)
    (sweep / "comparison.json").write_text(json.dumps(table, indent=2, default=str))
    return text


class SweepComparison(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        table = rows(sweep)
        if not table:
            return
        write_comparison(sweep)
        from rich.console import Console
        from rich.table import Table

        view = Table(title=f"ftk finetune sweep: {sweep}", title_justify="left")
        for column in COLUMNS:
            view.add_column(column, justify="left" if column in ("run", "regime") else "right")
        for r in table:
            view.add_row(*(str(r[c]) for c in COLUMNS))
        Console().print(view)
        Console(stderr=True).print(f"comparison written to {sweep / 'comparison.md'}")
