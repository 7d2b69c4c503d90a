"""Fine-tuning regimes: one small module each, behind one registry.

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
from ftk.schemas import Objective, Regime

# regime -> module under ftk.regimes with `apply(model, ctx) -> Prepared`
REGISTRY = {
    Regime.full: "full",
    Regime.feature_extraction: "feature_extraction",
    Regime.lora: "lora",
    Regime.qlora: "lora",  # the same adapters; the 4-bit base is loaded by ftk.regimes.qlora_base
    Regime.prompt_tuning: "prompt_tuning",
    Regime.freeze_layers: "freeze_layers",
    Regime.gradual_unfreeze: "gradual_unfreeze",
    Regime.head_then_full: "head_then_full",
}

# Regimes whose point is a new head trained (at first) on a frozen body: they need one.
NEEDS_NEW_HEAD = (Regime.feature_extraction, Regime.head_then_full)
# Regimes saved as a PEFT adapter (adapter_config.json + adapter_model.safetensors).
ADAPTERS = (Regime.lora, Regime.qlora, Regime.prompt_tuning)


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


def check_fits(regime: Regime, objective: Objective) -> None:
    """Refuse a regime that cannot serve the objective, before anything is loaded."""
    if regime in NEEDS_NEW_HEAD and objective is not Objective.classification:
        raise UsageError(f"regime={regime.value} trains a new task head, and objective={objective.value} has none; "
                         "use objective=classification, or regime=freeze_layers / lora for language modelling")
    if regime is Regime.prompt_tuning and objective is Objective.mlm:
        raise UsageError("regime=prompt_tuning supports objective=classification, clm and sft, not mlm; "
                         "use regime=lora for continued masked-LM training")


def apply(regime: Regime, model: Any, ctx: Context) -> Prepared:
    check_fits(regime, ctx.objective)
    module = importlib.import_module(f"ftk.regimes.{REGISTRY[regime]}")
    prepared = module.apply(model, ctx)
    prepared.adapter = regime in ADAPTERS
    return prepared
