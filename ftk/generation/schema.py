"""Typed schema of `ftk generate` (its own module, as `ftk evaluate`'s)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from ftk.ranges import SEED_MAX, ranged
from ftk.schemas import HardwareConfig, ModelConfig


class PromptFormat(str, Enum):
    auto = "auto"                # instruction for an instruction/preference-tuned model or a chat template, else raw
    raw = "raw"                  # the text is continued as it is (a pretrained language model)
    instruction = "instruction"  # wrapped as `ftk finetune objective=sft` trained it (chat template or Alpaca layout)


class ScoreText(str, Enum):
    full = "full"                # prompt + completion, as a reader sees it
    completion = "completion"    # the generated text only


@dataclass
class SamplingConfig:
    max_new_tokens: int = ranged(64, ge=1, le=1_000_000)
    do_sample: bool = True       # false: greedy decoding (temperature, top_p and top_k unused)
    temperature: float = ranged(1.0, ge=0, le=100)  # 0 = greedy, as in vLLM and the OpenAI API
    top_p: float = ranged(1.0, gt=0, le=1)  # nucleus sampling; 1 = off
    top_k: int = ranged(0, ge=0)  # 0 = off
    repetition_penalty: float = ranged(1.0, gt=0, le=100)
    samples_per_prompt: int = ranged(1, ge=1, le=10_000)
    seed: int = ranged(0, ge=0, le=SEED_MAX)  # with the batch size, fixes every sample


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    adapter_path: Optional[str] = None  # a PEFT adapter (final/ of a LoRA / prompt-tuning / DPO run)
    allow_other_base: bool = False
    # The prompts: a text, a list of texts, a .txt file (one per line) or a .jsonl(.gz) file whose records hold
    # `prompt` (or `prompt_field`), `instruction` (+ `input`), or chat `messages`.
    prompts: Any = None
    prompt_field: str = "prompt"
    prompt_format: PromptFormat = PromptFormat.auto
    max_prompts: Optional[int] = ranged(None, ge=1)  # only the first N prompts of a file
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = ranged(8, ge=1)  # prompts per generate() call (left-padded, with the KV cache)
    # Classifiers or reward models (final/ of a finetune run) scoring each sample: one path, or a list (`score` is
    # the first's, `scores` all of them in order)
    score_with: Any = None
    score_label: Optional[str] = None   # the classifiers' label whose probability is the score; null = the last
    # A model (or adapter) the samples' log-probabilities are also read under: each sample's `logprob` and
    # `ref_logprob`, and settings.json's `kl_estimate` of KL(model || kl_reference) per sequence
    kl_reference: Optional[str] = None
    score_text: ScoreText = ScoreText.full
    print_samples: Optional[int] = ranged(None, ge=0)  # samples shown on the terminal; null = all when 20 or fewer


def register() -> None:
    from hydra.core.config_store import ConfigStore

    from ftk import schemas

    schemas.register()
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
