"""What besides the model's shape decides a run's memory (Setup), read from a composed config; and
which Linears an adapter targets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence

from ftk.errors import UsageError
from ftk.objectives.table import MlmSettings
from ftk.planner.shapes import DEFAULT_NUM_LABELS, Linear, Shape


@dataclass(frozen=True)
class Setup:
    """Everything besides the shape that decides the memory of a run (resolved: no `auto` left)."""

    regime: str = "full"             # a row of ftk.regimes.table
    objective: str = "clm"           # clm | mlm | sft | classification
    precision: str = "fp32"          # fp32 | bf16 | fp16
    weights: str = "ftk"             # ftk: as ftk holds them | 16bit: the textbook convention (see module doc)
    optimizer: str = "adamw_fused"   # adamw | adamw_fused | adamw_8bit
    micro_batch_size: int = 1        # sequences per forward per device
    seq_len: int = 256
    gradient_checkpointing: bool = False
    devices: int = 1
    strategy: str = "none"           # none | ddp | fsdp
    device: str = "cpu"              # cpu | cuda (decides the overhead)
    settings: Any = None             # the regime's settings (ftk.regimes.table); None = its defaults
    num_labels: int = DEFAULT_NUM_LABELS
    mlm_probability: float = MlmSettings.mlm_probability
    finetuning: bool = True          # False for `ftk pretrain`: no regime changes are suggested
    matmul_attention: bool = False   # ftk.cpu_attention (CPU bf16): keeps each layer's attention probabilities
    batch_size: Optional[int] = None  # global batch (sequences per optimizer step), for the accumulation shown
    pairs: bool = False              # preference objectives: each example is two sequences (chosen, rejected)
    reference: str = "none"          # the reference policy (ftk.preference_setup.reference_strategy): none |
                                     # adapter_off | frozen_copy (16-bit) | precomputed
    # the model's logits are head(hidden), so the loss can go through ftk.objectives.linear_cross_entropy (the
    # full logits never exist); False for an adapter on the head or soft-capped logits (ftk.planner.costs also
    # leaves it for FSDP and preference objectives)
    fused_head: bool = True

    @property
    def facts(self):
        from ftk.regimes.table import facts

        return facts(self.regime)

    @property
    def regime_settings(self) -> Any:
        return self.settings if self.settings is not None else self.facts.settings()

    def with_regime(self, name: str) -> "Setup":
        """The same run under regime `name` with its default settings (what a suggestion proposes)."""
        return replace(self, regime=name, settings=None)


# peft's default LoRA targets, restated so that planning a LoRA run does not import peft (and torch)
DEFAULT_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
                   "qwen2": ("q_proj", "v_proj"), "bert": ("query", "value"), "roberta": ("query", "value")}


def adapter_targets(shape: Shape, targets: Optional[Sequence[str]], table: str = "lora") -> List[Linear]:
    """The block Linears an adapter adapts: peft's rule (a target names a module or the end of its path);
    no `targets` = peft's default for the family from its `table` ("lora" or "ia3")."""
    names = tuple(targets) if targets else (DEFAULT_TARGETS.get(shape.model_type) if table == "lora" else None)
    if names is None:
        from peft.utils import constants

        mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{table.upper()}_TARGET_MODULES_MAPPING")
        names = tuple(mapping.get(shape.model_type, ()))
        if not names:
            raise UsageError(f"no default {table} target modules for model type '{shape.model_type}'; "
                             "set regime.target_modules=[...]")
    chosen = [lin for lin in shape.linears if any(lin.name == t or lin.name.endswith("." + t) for t in names)]
    if not chosen:
        raise UsageError(f"regime.target_modules={list(names)} match no Linear of a {shape.model_type} block "
                         f"({', '.join(lin.name for lin in shape.linears)})")
    return chosen


def setup_from_cfg(cfg: Any, *, devices: Optional[int] = None, plan: Any = None, weights: str = "ftk") -> Setup:
    """The Setup of a composed pretrain/finetune/estimate config under `plan` (ftk.hardware.Plan), the run's own
    when it has resolved one; else resolved by ftk.hardware.resolve in its lenient mode (planning for a device
    or a process count this machine lacks), over `devices` processes."""
    hw, t = cfg.hardware, cfg.train
    finetuning = "regime" in cfg
    r = cfg.regime if finetuning else None
    if plan is None:
        from ftk.hardware import resolve

        plan = resolve(hw, t.batch_size, t.max_steps, world=devices, lenient=True)
    objective = cfg.objective.name
    objective = getattr(objective, "value", objective)
    from omegaconf import OmegaConf

    from ftk.objectives.table import facts as objective_facts

    pairs = objective_facts(objective).data == "preferences"
    reference = "none"
    if pairs and finetuning:
        from ftk.preference_setup import reference_strategy
        from ftk.regimes.table import facts as regime_facts

        reference = reference_strategy(cfg.objective, regime_facts(r.name))
    extra = {"num_labels": 1} if pairs and objective_facts(objective).head == "sequence_classification" else {}

    return Setup(
        regime=r.name if r is not None else "full", settings=OmegaConf.to_object(r) if r is not None else None,
        objective=objective, precision=plan.precision, weights=weights, optimizer=plan.optimizer,
        micro_batch_size=plan.micro_batch_size, seq_len=t.seq_len, gradient_checkpointing=bool(hw.gradient_checkpointing),
        devices=plan.world_size, strategy=plan.strategy, device=plan.device,
        mlm_probability=cfg.objective.get("mlm_probability", MlmSettings.mlm_probability), finetuning=finetuning,
        batch_size=t.batch_size, matmul_attention=bool(plan.matmul_attention), pairs=pairs, reference=reference,
        **extra)
