"""What each training objective is: its settings schema and every fact other code asks about it.

One row per objective, in the style of ftk/regimes/table.py: the class that implements the contract of
ftk/objectives/base.py, what data it reads, which head it needs, which models it fits, whether
validation reports perplexity, and whether `ftk pretrain` accepts it. Adding an objective is its YAML
(configs/objective/<name>.yaml), its module and its row here.

Torch-free: Hydra registers the settings schemas from here while composing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Tuple

from ftk.ranges import ranged
from ftk.table import Table


@dataclass
class ObjectiveSettings:
    name: str = "clm"


@dataclass
class ClmSettings(ObjectiveSettings):
    name: str = "clm"


@dataclass
class MlmSettings(ObjectiveSettings):
    name: str = "mlm"
    mlm_probability: float = ranged(0.15, gt=0, le=1)  # share of tokens selected for prediction (BERT: 0.15)
    mask_replace_prob: float = ranged(0.8, ge=0, le=1)  # of the selected: share replaced by [MASK]
    # of the selected: share replaced by a random token; the rest stay
    random_replace_prob: float = ranged(0.1, ge=0, le=1)


@dataclass
class ClassificationSettings(ObjectiveSettings):
    name: str = "classification"


@dataclass
class SftSettings(ObjectiveSettings):
    name: str = "sft"


class PreferenceLoss(str, Enum):
    sigmoid = "sigmoid"  # DPO (Rafailov et al. 2023); with label_smoothing > 0, conservative DPO
    ipo = "ipo"          # IPO (Azar et al. 2023): squared loss, per-token log-ratios


class ReferenceKind(str, Enum):
    auto = "auto"                # adapters: the policy with its adapter off; otherwise a frozen 16-bit copy
    precomputed = "precomputed"  # log-probabilities computed once before training, cached beside the data


@dataclass
class DpoSettings(ObjectiveSettings):
    name: str = "dpo"
    loss: PreferenceLoss = PreferenceLoss.sigmoid
    beta: float = ranged(0.1, gt=0)  # strength of the pull to the reference (the KL penalty's inverse temperature)
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)  # loss=sigmoid: assumed share of flipped labels (cDPO)
    reference: ReferenceKind = ReferenceKind.auto


@dataclass
class SimpoSettings(ObjectiveSettings):
    name: str = "simpo"
    beta: float = ranged(2.0, gt=0)  # scale of the length-normalised reward (SimPO's default 2.0)
    gamma: float = ranged(0.5, ge=0)  # target reward margin between chosen and rejected
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)


@dataclass
class OrpoSettings(ObjectiveSettings):
    name: str = "orpo"
    beta: float = ranged(0.1, gt=0)  # weight of the odds-ratio term against the SFT loss (the paper's lambda)


@dataclass
class RewardSettings(ObjectiveSettings):
    name: str = "reward"


@dataclass(frozen=True)
class ObjectiveFacts:
    name: str
    settings: type            # the schema of its config group option
    implementation: str       # "module:Class" implementing ftk.objectives.base.Objective, built as Class(settings,
                              # tokenizer)
    title: str
    data: str                 # what it reads: "text" (packed blocks) | "labelled" (text + label) | "instructions"
                              # | "preferences" (prompt, chosen, rejected)
    head: str                 # the transformers head: "causal_lm" | "masked_lm" | "sequence_classification"
    models: str               # which models it fits: "decoder" | "encoder" | "any"
    language_model: bool      # validation reports loss per token and perplexity (else loss and accuracy)
    pretraining: bool         # `ftk pretrain` accepts it (else it is a fine-tuning objective)
    peft_task_type: Optional[str] = None  # peft's task_type for adapters trained with it
    reference: bool = False   # needs a reference policy (the model before training) beside the one that trains
    packs: bool = False       # its examples can share rows with attention kept inside each (ftk.data.packing):
                              # data.packing=null turns packing on for it


ROWS: Tuple[ObjectiveFacts, ...] = (
    ObjectiveFacts("clm", ClmSettings, "ftk.objectives.clm:CausalLM", "next-token prediction (GPT, Llama)",
                   data="text", head="causal_lm", models="decoder", language_model=True, pretraining=True,
                   peft_task_type="CAUSAL_LM"),
    ObjectiveFacts("mlm", MlmSettings, "ftk.objectives.mlm:MaskedLM", "masked-token prediction (BERT, RoBERTa)",
                   data="text", head="masked_lm", models="encoder", language_model=True, pretraining=True),
    ObjectiveFacts("classification", ClassificationSettings, "ftk.objectives.classification:Classification",
                   "a new task head on the pretrained body", data="labelled", head="sequence_classification",
                   models="any", language_model=False, pretraining=False, peft_task_type="SEQ_CLS"),
    ObjectiveFacts("sft", SftSettings, "ftk.objectives.sft:SupervisedFineTuning",
                   "instruction tuning, loss on response tokens only", data="instructions", head="causal_lm",
                   models="decoder", language_model=True, pretraining=False, peft_task_type="CAUSAL_LM",
                   packs=True),
    ObjectiveFacts("dpo", DpoSettings, "ftk.objectives.preference:DirectPreference",
                   "preference tuning against a reference (DPO, IPO, cDPO)", data="preferences", head="causal_lm",
                   models="decoder", language_model=False, pretraining=False, peft_task_type="CAUSAL_LM",
                   reference=True),
    ObjectiveFacts("simpo", SimpoSettings, "ftk.objectives.preference:SimplePreference",
                   "reference-free, length-normalised preference tuning", data="preferences", head="causal_lm",
                   models="decoder", language_model=False, pretraining=False, peft_task_type="CAUSAL_LM"),
    ObjectiveFacts("orpo", OrpoSettings, "ftk.objectives.preference:OddsRatioPreference",
                   "SFT on the chosen response plus an odds-ratio preference term", data="preferences",
                   head="causal_lm", models="decoder", language_model=False, pretraining=False,
                   peft_task_type="CAUSAL_LM"),
    ObjectiveFacts("reward", RewardSettings, "ftk.objectives.preference:RewardModel",
                   "a reward model: one score per sequence, Bradley-Terry loss on pairs", data="preferences",
                   head="sequence_classification", models="any", language_model=False, pretraining=False,
                   peft_task_type="SEQ_CLS"),
)

_TABLE = Table("objective", ROWS)
TABLE = _TABLE.by_name
NAMES = _TABLE.names
facts = _TABLE.facts                # the row of a objective by name
settings_of = _TABLE.settings_of    # its default settings as a structured config


def fits(name: Any, encoder: bool) -> bool:
    """Whether objective `name` can train a model that is an encoder (or a decoder)."""
    models = facts(name).models
    return models == "any" or models == ("encoder" if encoder else "decoder")


def language_objective(encoder: bool) -> str:
    """The pretraining objective of a model: what its language-model head was trained with."""
    return next(row.name for row in ROWS if row.pretraining and fits(row.name, encoder))


def build(settings: Any, tokenizer: Any) -> Any:
    """The objective its settings name, ready for the training loop (imports torch)."""
    module, cls = facts(settings.name).implementation.split(":")
    return getattr(importlib.import_module(module), cls)(settings, tokenizer)
