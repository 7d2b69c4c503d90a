"""The planner's reports: the table, the verdict, the suggestions, and the check before launch.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from ftk.errors import UsageError
from ftk.planner.budget import budget_for
from ftk.planner.costs import Estimate
from ftk.planner.setup import setup_from_cfg
from ftk.planner.shapes import GB, count, gb, shape_from_checkpoint, shape_from_config, shape_from_model_options
from ftk.planner.suggestions import _per_process, estimate


def describe_setup(e: Estimate) -> str:
    u = e.setup
    share = e.trainable / max(e.parameters, 1)
    weights = "" if u.weights == "ftk" else ", textbook 16-bit weights"
    precision = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[u.precision]
    accumulation = ""
    if u.batch_size:
        steps = max(1, _per_process(u) // max(1, u.micro_batch_size))
        accumulation = f", {steps} accumulation step{'s' if steps != 1 else ''}"
    devices = f"{u.devices} {u.device} device{'s' if u.devices != 1 else ''}" + (
        f" ({u.strategy})" if u.devices > 1 else "")
    return (f"regime {u.regime} ({count(e.trainable)} of {count(e.parameters)} parameters train, "
            f"{share:.2%}), objective {u.objective}, {precision}{weights}, {u.optimizer}, micro-batch "
            f"{u.micro_batch_size} x {u.seq_len} tokens{accumulation}"
            f"{', gradient checkpointing' if u.gradient_checkpointing else ''}, {devices}")


def table_lines(e: Estimate) -> List[str]:
    """The estimate as plain text lines (for a run's log)."""
    rows = e.rows()
    if e.budget is not None:
        rows.append(("budget", e.budget, e.budget_source))
    width = max(len(r[0]) for r in rows)
    return [f"  {name:<{width}}  {value / GB:>9,.2f} GB  {how}" for name, value, how in rows]


def suggestion_lines(e: Estimate) -> List[str]:
    if not e.suggestions:
        return []
    if any(s.fits for s in e.suggestions):
        head = "would fit (cheapest change first):"
    else:
        head = "no change fits on its own; each would need:"
    return [head] + [f"  {s.overrides:<44} {gb(s.total):>10}" + ("" if s.fits else "  (still too much)")
                     for s in e.suggestions]


def one_line(e: Estimate) -> str:
    best = e.best_suggestion()
    if best is not None:
        fix = f"{best.overrides} would fit ({gb(best.total)})"
    elif e.suggestions:
        nearest = min(e.suggestions, key=lambda s: s.total)
        fix = f"nothing tried fits (closest: {nearest.overrides}, {gb(nearest.total)})"
    else:
        fix = "lower train.seq_len or hardware.micro_batch_size"
    return (f"the run {e.verdict.replace('does not fit: ', 'does not fit in memory: ')}; {fix}; "
            "or hardware.check_memory=false to start anyway")


def print_estimate(e: Estimate, console: Any = None) -> None:
    """The estimate as a rich table with the verdict and suggestions (`ftk estimate`)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(highlight=False, soft_wrap=True)
    model_params = e.shape.parameters(e.setup.objective, e.setup.num_labels)
    console.print(f"model: {escape(e.shape.describe())}; {count(model_params)} parameters"
                  + (f" ({escape(e.shape.source)})" if e.shape.source else ""))
    console.print(f"run: {escape(describe_setup(e))}")
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("component")
    table.add_column("GB", justify="right")
    table.add_column("how")
    for name, value, how in e.rows():
        style = "bold" if name.startswith("total") else None
        table.add_row(name, f"{value / GB:,.2f}", escape(how), style=style)
    if e.budget is not None:
        table.add_row("budget", f"{e.budget / GB:,.2f}", escape(e.budget_source))
    console.print(table)
    for note in e.notes:
        console.print(f"note: {escape(note)}")
    colour = {True: "green", False: "red", None: "yellow"}[e.fits]
    console.print(f"[{colour}]verdict: {escape(e.verdict)}[/{colour}]")
    for line in suggestion_lines(e):
        console.print(escape(line))


def check_before_launch(cfg: Any, model_config: Any, say: Callable[[str], None], plan: Any = None) -> Optional[Estimate]:
    """Run the planner before anything large is loaded; stop the run (UsageError, exit 2) with the table and
    the cheapest change that would fit when it cannot fit, unless hardware.check_memory=false.

    `model_config`: the transformers config of the model to load (finetune's base_config), or None: the
    checkpoint at model.name_or_path, else the shape of the `model` options (a model built from scratch).
    `plan`: the run's ftk.hardware.Plan (session.plan), so the planner uses the same device, precision,
    micro-batch and world size as the run."""
    if not cfg.hardware.check_memory:
        return None
    from rich.markup import escape

    if model_config is not None:
        shape = shape_from_config(model_config, str(cfg.model.name_or_path or ""))
    elif cfg.model.name_or_path:
        shape = shape_from_checkpoint(cfg.model.name_or_path, cfg.model.trust_remote_code)
    else:
        shape = shape_from_model_options(cfg.model, "built from scratch")
    setup = setup_from_cfg(cfg, plan=plan)
    budget, source = budget_for(cfg.hardware, setup)
    result = estimate(shape, setup, budget, source)
    if result.fits is False:
        say(f"memory plan ({escape(describe_setup(result))}):")
        for line in table_lines(result) + suggestion_lines(result):
            say(escape(line))
        raise UsageError(one_line(result))
    if result.fits:
        say(f"memory: {escape(result.verdict)} (planner; hardware.check_memory=false skips it)")
    else:
        say(f"memory: {escape(result.verdict)}")
    return result
