"""What would make a run fit: single changes cheapest first, else the cheapest combination.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

from ftk.planner.costs import Estimate, Suggestion, _components
from ftk.planner.setup import Setup
from ftk.planner.shapes import Shape


# suggestions cheapest first: a lighter regime (ranks 0-1, in the order of its row's `lighter`), then ...
RANK = {"regime": 0, "gradient_checkpointing": 2, "micro_batch_size": 3, "adamw_8bit": 4, "fsdp": 5}


def estimate(shape: Shape, setup: Setup, budget: Optional[int] = None, budget_source: str = "",
             suggest: bool = True) -> Estimate:
    """Bytes per device of a run of `setup` on a model of `shape`, against `budget` (bytes or None)."""
    est = _components(shape, setup)
    est.budget, est.budget_source = budget, budget_source
    if suggest and budget is not None and est.total > budget:
        est.suggestions = suggestions(shape, setup, budget)
    return est


def _per_process(u: Setup) -> int:
    return max(1, (u.batch_size or u.micro_batch_size * u.devices) // max(1, u.devices))


def _lighter_regimes(shape: Shape, u: Setup) -> List[str]:
    """The regimes to suggest instead of the run's (its row's `lighter`); a 4-bit base only for decoders."""
    if not u.finetuning:
        return []
    from ftk.regimes.table import facts

    return [name for name in u.facts.lighter if not (facts(name).quantized and shape.encoder)]


def _candidates(shape: Shape, u: Setup) -> List[Tuple[str, Setup, int]]:
    """Single changes that lower the peak, cheapest first (see RANK): (overrides, setup, rank)."""
    out: List[Tuple[str, Setup, int]] = []
    for position, name in enumerate(_lighter_regimes(shape, u)):
        out.append((f"regime={name}", u.with_regime(name), RANK["regime"] + min(position, 1)))
    if not u.gradient_checkpointing:
        out.append(("hardware.gradient_checkpointing=true", replace(u, gradient_checkpointing=True),
                    RANK["gradient_checkpointing"]))
    if u.micro_batch_size > 1:
        per = _per_process(u)
        for m in sorted((d for d in range(1, u.micro_batch_size) if per % d == 0), reverse=True):
            out.append((f"hardware.micro_batch_size={m}", replace(u, micro_batch_size=m), RANK["micro_batch_size"]))
    if u.optimizer != "adamw_8bit" and u.strategy != "fsdp":  # FSDP refuses 8-bit AdamW (ftk.session)
        out.append(("hardware.optimizer=adamw_8bit", replace(u, optimizer="adamw_8bit"), RANK["adamw_8bit"]))
    return out


def suggestions(shape: Shape, u: Setup, budget: int) -> List[Suggestion]:
    """Changes that would make the run fit, cheapest first; when no single one does, the cheapest
    combination that does; when none does, every single change with what it would need."""
    found: List[Suggestion] = []
    by_kind: Dict[int, Suggestion] = {}
    for overrides, setup, rank in _candidates(shape, u):
        total = _components(shape, setup).total
        s = Suggestion(overrides, total, total <= budget, rank)
        if rank == RANK["micro_batch_size"]:  # the largest micro-batch that fits (or 1, the lowest)
            previous = by_kind.get(rank)
            if previous is not None and previous.fits:
                continue
            if previous is not None:
                found.remove(previous)
        by_kind[rank] = s
        found.append(s)
    fsdp = _more_devices(shape, u, budget)
    if fsdp is not None:
        found.append(fsdp)
    fitting = [s for s in found if s.fits]
    if fitting:
        return sorted(fitting, key=lambda s: s.rank)
    combined = _combination(shape, u, budget)
    rest = sorted(found, key=lambda s: s.rank)
    return ([combined] if combined is not None else []) + rest


def _more_devices(shape: Shape, u: Setup, budget: int) -> Optional[Suggestion]:
    """Shard weights, gradients and optimizer state over more GPUs (FSDP): the fewest that fit. FSDP refuses
    8-bit AdamW (its state is not sharded), so a run that uses it is planned with the fused AdamW instead."""
    if u.device != "cuda":
        return None  # processes on one CPU share its memory: more of them do not help
    switch = " hardware.optimizer=adamw_fused" if u.optimizer == "adamw_8bit" else ""
    u = replace(u, optimizer="adamw_fused") if switch else u
    for world in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if world <= u.devices and u.strategy == "fsdp":
            continue
        per = _per_process(u)
        micro = max(1, min(u.micro_batch_size, (u.batch_size or per * u.devices) // world))
        setup = replace(u, devices=world, strategy="fsdp", micro_batch_size=micro)
        total = _components(shape, setup).total
        if total <= budget:
            return Suggestion(f"hardware.strategy=fsdp{switch} on {world} GPUs", total, True, RANK["fsdp"])
    return None


def _combination(shape: Shape, u: Setup, budget: int) -> Optional[Suggestion]:
    steps: List[Tuple[str, Callable[[Setup], Setup]]] = []
    lighter = _lighter_regimes(shape, u)
    if lighter:  # the lightest of them
        steps.append((f"regime={lighter[-1]}", lambda x: x.with_regime(lighter[-1])))
    if not u.gradient_checkpointing:
        steps.append(("hardware.gradient_checkpointing=true", lambda x: replace(x, gradient_checkpointing=True)))
    if u.micro_batch_size > 1:
        steps.append(("hardware.micro_batch_size=1", lambda x: replace(x, micro_batch_size=1)))
    if u.optimizer != "adamw_8bit" and u.strategy != "fsdp":
        steps.append(("hardware.optimizer=adamw_8bit", lambda x: replace(x, optimizer="adamw_8bit")))
    setup, applied = u, []
    for text, change in steps:
        setup = change(setup)
        applied.append(text)
        total = _components(shape, setup).total
        if len(applied) > 1 and total <= budget:
            return Suggestion(" ".join(applied), total, True, len(RANK))
    if len(applied) > 1:  # sharded: without 8-bit AdamW, which FSDP refuses
        applied = [text for text in applied if "adamw_8bit" not in text]
        more = _more_devices(shape, replace(setup, optimizer=u.optimizer), budget)
        if more is not None:
            return Suggestion(" ".join(applied + [more.overrides]), more.total, True, len(RANK) + 1)
    return None
