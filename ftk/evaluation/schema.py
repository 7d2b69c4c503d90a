"""Typed schema of `ftk evaluate` (its own module so that the subcommands' schemas evolve apart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from ftk.ranges import SEED_MAX, ranged
from ftk.schemas import DataConfig, HardwareConfig, ModelConfig


class EvalKind(str, Enum):
    auto = "auto"                  # from the model: classifier -> classification, LM -> perplexity
    perplexity = "perplexity"      # causal LM: sliding-window perplexity; masked LM: masked-token loss/accuracy
    classification = "classification"
    icl = "icl"                    # in-context learning: k-shot prompts, answer by verbalizer log-likelihood
    preference = "preference"      # held-out preference pairs: pair accuracy and margin of a policy or reward model
    harness = "harness"            # EleutherAI's lm-evaluation-harness: eval.tasks, eval.include_path (local tasks)


@dataclass
class EvalConfig:
    kind: EvalKind = EvalKind.auto
    context: Optional[int] = ranged(None, ge=2)  # perplexity window; null = the model's positions (at most 1024)
    stride: Optional[int] = ranged(None, ge=1)  # tokens the window advances; null = context // 2. Each token is scored
                                      # once, with at least context - stride tokens before it
    batch_size: int = ranged(8, ge=1)  # windows / examples per forward; never changes a result
    max_tokens: Optional[int] = ranged(None, ge=2)  # evaluate only the first N tokens of the text
    pseudo_perplexity: bool = False   # masked LM: also mask each token in turn (one forward per token)
    seed: int = ranged(0, ge=0, le=SEED_MAX)  # masking draws, shot draws
    shots: List[int] = ranged(default_factory=lambda: [0, 1, 8], ge=0)  # icl: k per row of the table
    num_test: int = ranged(200, ge=1)  # icl: test examples (the same for every k)
    template: str = "{text}\nAnswer: {label}"  # icl: one example; shots are joined by a blank line
    verbalizers: Optional[List[str]] = None    # icl: the word for each label (sorted label order); null = names
    max_examples: Optional[int] = ranged(None, ge=1)  # classification, preference, harness: only the first N
    # preference: the reference policy of a DPO-family model (null: its adapter switched off, or the base it was
    # tuned from); for a reward model, the causal LM whose log-likelihood preference is the baseline
    reference: Optional[str] = None
    beta: Optional[float] = ranged(None, gt=0)  # preference: scale of implicit rewards; null = the run's objective.beta
    tasks: Optional[List[str]] = None  # harness: lm-eval task (or group) names, e.g. [hellaswag,arc_easy]
    include_path: Optional[str] = None  # harness: a folder of task YAMLs (local tasks over local data: offline)
    num_fewshot: Optional[int] = ranged(None, ge=0)  # harness: shots per prompt; null = each task's own default


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapter_path: Optional[str] = None  # a PEFT adapter (final/ of a LoRA / prompt-tuning finetune run)
    compare_to: Optional[str] = None    # a second model: both perplexities on the same text, and the change
    allow_other_base: bool = False      # evaluate an adapter on a base whose weights are not those it was trained on


def register() -> None:
    from hydra.core.config_store import ConfigStore

    from ftk import schemas

    schemas.register()
    cs = ConfigStore.instance()
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="eval", name="schema", node=EvalConfig)
