"""curves.png: training loss, validation loss (and accuracy), learning rate and tokens/s against steps, drawn from
metrics.jsonl, so that a run is watched as a picture, and `ftk plot` overlays several runs.

Drawn at every checkpoint and at the end of a run from the file alone: a resumed run's file is trimmed to its
checkpoint and continued (ftk.train.MetricsLog), so its curve is continuous. Drawing never fails a run (any error
is reported in one line and training goes on) and is cheap: matplotlib's Agg backend, one small figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# (title, key in metrics.jsonl, second key drawn on a twin axis when present)
PANELS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("training loss", "loss", None),
    ("validation", "eval_loss", "eval_accuracy"),
    ("learning rate", "lr", None),
    ("tokens/s (training)", "tokens_per_s", None),
)


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """metrics.jsonl's lines; a line cut short by a kill is skipped."""
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            out.append(record)
    return out


def series(records: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def draw(runs: Sequence[Tuple[str, Sequence[Dict[str, Any]]]], path: Path, title: str = "") -> Path:
    """One 2x2 figure, one line per run in each panel; written atomically (a reader never sees half a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, key, second) in zip(axes.flat, PANELS):
        twin = None
        for i, (label, records) in enumerate(runs):
            color = colors[i % len(colors)]
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, color=color, label=label, marker="o" if len(steps) < 12 else None,
                        markersize=3)
            if second:
                steps2, values2 = series(records, second)
                if steps2:
                    twin = twin or ax.twinx()
                    twin.plot(steps2, values2, color=color, linestyle="--", marker="s", markersize=3)
                    twin.set_ylabel("accuracy (dashed)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes[1]:
        ax.set_xlabel("step")
    if len(runs) > 1 or any(label for label, _ in runs):
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if len(runs) > 1 else 0, 1, 1))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # savefig picks the format by the suffix
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write(run_dir: Path, say: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """<run>/curves.png from its metrics.jsonl; never raises (a picture is not worth a failed run)."""
    try:
        records = read_metrics(run_dir)
        if not records:
            return None
        return draw([("", records)], Path(run_dir) / "curves.png", title=str(run_dir))
    except Exception as exc:  # noqa: BLE001 - any failure to draw is reported and ignored
        if say is not None:
            say(f"[yellow]curves.png not drawn: {type(exc).__name__}: {exc}[/yellow]")
        return None
