"""Fine-tuning regimes: one small module each, and one table of what each is (ftk/regimes/table.py).

A regime decides which weights train. `apply(name, model, ctx)` returns the model to train (maybe
wrapped by peft), callbacks the loop calls before each step (to unfreeze on a schedule), and an
optional learning-rate multiplier by step. Every choice is a pure function of the step, so a
resumed run freezes and unfreezes exactly as the uninterrupted one did.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from ftk.errors import UsageError
from ftk.regimes.table import facts
from ftk.schemas import Objective


@dataclass
class Context:
    settings: Any              # the `regime` config group
    objective: Objective
    new_head: List[str]        # parameter names freshly initialised when the model was loaded (the task head)


@dataclass
class Prepared:
    model: Any
    callbacks: List[Any] = field(default_factory=list)
    lr_multiplier: Optional[Callable[[int], float]] = None
    adapter: bool = False       # saved as a PEFT adapter rather than a whole model
    note: str = ""              # one line on what the regime did, printed at start


def check_fits(regime: str, objective: Objective) -> None:
    """Refuse a regime that cannot serve the objective, before anything is loaded."""
    from ftk.objectives.table import facts as objective_facts

    row, objective = facts(regime), Objective(objective)
    if row.needs_new_head and objective_facts(objective).head != "sequence_classification":
        raise UsageError(f"regime={row.name} trains a new task head, and objective={objective.value} has none; "
                         "use objective=classification or reward, or regime=freeze_layers / lora for language "
                         "modelling")
    if objective.value in row.refuses:
        served = ", ".join(o.value for o in Objective if o.value not in row.refuses)
        fix = "; use regime=lora for continued masked-LM training" if objective is Objective.mlm else ""
        raise UsageError(f"regime={row.name} supports objective={served}, not {objective.value}{fix}")


def apply(regime: str, model: Any, ctx: Context) -> Prepared:
    """Apply regime `regime` (its row names the module) to `model`."""
    check_fits(regime, ctx.objective)
    row = facts(regime)
    prepared = importlib.import_module(f"ftk.regimes.{row.module}").apply(model, ctx)
    prepared.adapter = row.adapter is not None
    return prepared
