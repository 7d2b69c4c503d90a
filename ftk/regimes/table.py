"""What each fine-tuning regime is: its settings schema and every fact other code asks about it.

One row per regime. Loading, the memory planner and its suggestions, finetune, merge-adapter and
estimate read these facts instead of listing regime names, so adding a regime is its YAML
(configs/regime/<name>.yaml), its module (ftk/regimes/<module>.py with `apply(model, ctx)`) and its row here.

Torch-free (only dataclasses and omegaconf); each field's range is declared with its default (ftk.ranges): Hydra registers the settings schemas from here while composing,
and the planner reads the costs without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, List, Optional, Tuple

from ftk.ranges import ranged
from ftk.table import Table


# ------------------------------------------------------------------------------------------------ settings
# Each regime's config group option is merged onto its own schema, so `regime=full regime.lora_r=64` stops
# with "Key 'lora_r' not in 'FullSettings'" instead of being ignored. Each default is written once, here.


class QuantType(str, Enum):
    nf4 = "nf4"  # 4-bit NormalFloat: the QLoRA paper's choice for normally distributed weights
    fp4 = "fp4"


class ComputeDtype(str, Enum):
    auto = "auto"  # fp16 for fp16 runs (GPUs before Ampere), else bf16
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@dataclass
class RegimeSettings:
    """What every regime has: its name and its default peak learning rate (train.lr overrides it)."""

    name: str = "full"
    lr: float = ranged(1e-4, gt=0)


@dataclass
class FullSettings(RegimeSettings):
    name: str = "full"


@dataclass
class FeatureExtractionSettings(RegimeSettings):
    name: str = "feature_extraction"
    lr: float = ranged(1e-3, gt=0)  # only a new head trains: a head can take a high rate


@dataclass
class LoraSettings(RegimeSettings):
    name: str = "lora"
    lr: float = ranged(1e-3, gt=0)
    lora_r: int = ranged(8, ge=1)  # rank of the update
    lora_alpha: int = ranged(16, ge=1)  # the update is scaled by alpha / r
    lora_dropout: float = ranged(0.05, ge=0, lt=1)  # dropout on the adapter's input
    target_modules: Optional[List[str]] = None  # module names; null = peft's default for the model family
                                                # (gpt2: c_attn; llama: q_proj,v_proj; bert: query,value)


@dataclass
class QloraSettings(LoraSettings):
    name: str = "qlora"
    quant_type: QuantType = QuantType.nf4
    compute_dtype: ComputeDtype = ComputeDtype.auto  # dtype of the de-quantized matmuls


@dataclass
class DoraSettings(LoraSettings):
    name: str = "dora"


@dataclass
class Ia3Settings(RegimeSettings):
    name: str = "ia3"
    lr: float = ranged(3e-3, gt=0)  # T-Few's rate for (IA)^3 vectors
    target_modules: Optional[List[str]] = None       # null = peft's default for the family
                                                     # (gpt2: c_attn, mlp.c_proj; llama: k_proj, v_proj, down_proj)
    feedforward_modules: Optional[List[str]] = None  # targets whose input (not output) is rescaled; null = peft's
                                                     # default with default targets, none with targets of your own


@dataclass
class PromptTuningSettings(RegimeSettings):
    name: str = "prompt_tuning"
    lr: float = ranged(3e-2, gt=0)  # a soft prompt needs a far higher rate than weights (Lester et al. 2021)
    num_virtual_tokens: int = ranged(20, ge=1)  # length of the soft prompt


@dataclass
class FreezeLayersSettings(RegimeSettings):
    name: str = "freeze_layers"
    freeze_layers: int = ranged(2, ge=0)  # blocks frozen from the bottom (with the embeddings)


@dataclass
class GradualUnfreezeSettings(RegimeSettings):
    name: str = "gradual_unfreeze"
    unfreeze_every: int = ranged(50, ge=1)  # steps between unfreezing one more block, from the top


@dataclass
class HeadThenFullSettings(RegimeSettings):
    name: str = "head_then_full"
    lr: float = ranged(1e-3, gt=0)
    head_steps: int = ranged(100, ge=0)  # steps with only the head training
    full_lr_ratio: float = ranged(0.1, gt=0)  # lr of the full phase, relative to regime.lr


# ------------------------------------------------------------------------------------------------ planner costs


@dataclass(frozen=True)
class AdapterCost:
    """What a peft adapter adds on each block Linear it targets (an ftk.planner.Linear), for the planner."""

    targets: str                             # peft's default-target table: "lora" | "ia3"; "prompt": none
    params: Callable[[Any, Any], int]        # (settings, linear) -> trainable parameters
    kept: Callable[[Any, Any], int]          # (settings, linear) -> values per token it keeps for backward
                                             # besides the input it shares with the frozen layer
    dropout: Callable[[Any], float] = lambda s: 0.0


LORA = AdapterCost("lora", params=lambda s, lin: s.lora_r * (lin.in_features + lin.out_features),
                   kept=lambda s, lin: s.lora_r, dropout=lambda s: s.lora_dropout)
# DoRA: LoRA plus a magnitude per output; it keeps the adapted layer's output for the magnitude's gradient
DORA = AdapterCost("lora", params=lambda s, lin: s.lora_r * (lin.in_features + lin.out_features) + lin.out_features,
                   kept=lambda s, lin: s.lora_r + lin.out_features, dropout=lambda s: s.lora_dropout)


def _ia3_feedforward(s: Any, lin: Any) -> bool:
    """Whether (IA)^3 rescales this Linear's input (a feed-forward module) rather than its output."""
    names = s.feedforward_modules
    if names is None and s.target_modules is None:  # peft's defaults, over every family it knows
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as mapping

        names = {n for family in mapping.values() for n in family}
    return any(lin.name == n or lin.name.endswith("." + n) for n in names or ())


# (IA)^3: one vector per target, as wide as what it rescales; it keeps the rescaled tensor for its gradient
IA3 = AdapterCost("ia3", params=lambda s, lin: lin.in_features if _ia3_feedforward(s, lin) else lin.out_features,
                  kept=lambda s, lin: 0 if _ia3_feedforward(s, lin) else lin.out_features)
PROMPT = AdapterCost("prompt", params=lambda s, lin: 0, kept=lambda s, lin: 0)


# ------------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class RegimeFacts:
    name: str
    settings: type                     # the schema of its config group option
    module: str                        # ftk.regimes.<module>.apply(model, ctx) applies it
    title: str                         # one line for tables and --help
    body: str                          # the pretrained blocks: "trains" | "frozen" (in the graph, adapters
                                       # inside) | "frozen_below" (settings.freeze_layers blocks frozen)
                                       # | "outside" (frozen, gradients never enter the body)
    head_trains: bool = False          # the (pretrained) output head trains, not only a new one
    adapter: Optional[AdapterCost] = None  # saved as a PEFT adapter; its planner cost (None: a whole model)
    virtual_tokens: bool = False       # prepends settings.num_virtual_tokens to every sequence (peft prompts)
    needs_new_head: bool = False       # only meaningful with a new task head (objective=classification)
    refuses: Tuple[str, ...] = ()      # objectives it cannot serve
    frozen_in_16bit: bool = False      # its frozen base is held in bf16/fp16 under bf16/fp16 precision
    quantized: bool = False            # its frozen base is 4-bit (bitsandbytes), loaded by ftk.regimes.qlora_base
    left_pad_decoder_classifier: bool = False  # a decoder classifier must pad left (fed inputs_embeds, it
                                               # cannot find its last real token; it reads the last position)
    phased: bool = False               # trains more over time; the planner plans its last phase
    lighter: Tuple[str, ...] = ()      # regimes the planner suggests instead when this one does not fit
    peft_types: Tuple[str, ...] = ()   # peft_type values of the adapters it saves
    mergeable: bool = False            # merge-adapter can fold its adapter into the base exactly


ROWS: Tuple[RegimeFacts, ...] = (
    RegimeFacts("full", FullSettings, "full", "every weight trains", body="trains", head_trains=True,
                lighter=("lora", "qlora")),
    RegimeFacts("feature_extraction", FeatureExtractionSettings, "feature_extraction",
                "frozen backbone, only the new head trains", body="outside", needs_new_head=True),
    RegimeFacts("lora", LoraSettings, "lora", "peft LoRA adapters (+ the new head)", body="frozen",
                adapter=LORA, frozen_in_16bit=True, lighter=("qlora",), peft_types=("LORA",), mergeable=True),
    RegimeFacts("qlora", QloraSettings, "lora", "4-bit NF4 frozen base (bitsandbytes) + LoRA", body="frozen",
                adapter=LORA, quantized=True, peft_types=("LORA",), mergeable=True),
    RegimeFacts("dora", DoraSettings, "dora", "peft DoRA: LoRA with a learned magnitude per output", body="frozen",
                adapter=DORA, frozen_in_16bit=True, lighter=("lora", "qlora"), peft_types=("LORA",), mergeable=True),
    RegimeFacts("ia3", Ia3Settings, "ia3", "peft (IA)^3: learned rescaling vectors; every weight frozen",
                body="frozen", adapter=IA3, frozen_in_16bit=True, peft_types=("IA3",), mergeable=True),
    RegimeFacts("prompt_tuning", PromptTuningSettings, "prompt_tuning", "peft soft prompt; every model weight frozen",
                body="frozen", adapter=PROMPT,
                virtual_tokens=True, refuses=("mlm",), frozen_in_16bit=True, left_pad_decoder_classifier=True,
                peft_types=("PROMPT_TUNING",)),
    RegimeFacts("freeze_layers", FreezeLayersSettings, "freeze_layers", "embeddings and the first k blocks frozen",
                body="frozen_below", head_trains=True, lighter=("lora", "qlora")),
    RegimeFacts("gradual_unfreeze", GradualUnfreezeSettings, "gradual_unfreeze",
                "ULMFiT: head first, then one more block from the top", body="trains", head_trains=True,
                phased=True, lighter=("lora", "qlora")),
    RegimeFacts("head_then_full", HeadThenFullSettings, "head_then_full",
                "head alone, then everything at a lower lr", body="trains", head_trains=True, needs_new_head=True,
                phased=True, lighter=("lora", "qlora")),
)

_TABLE = Table("regime", ROWS)
TABLE = _TABLE.by_name
NAMES = _TABLE.names
facts = _TABLE.facts                # the row of a regime by name
settings_of = _TABLE.settings_of    # its default settings as a structured config


def of_peft_type(peft_type: str) -> List[RegimeFacts]:
    """The regimes whose adapters have this peft_type (e.g. LORA: lora, qlora)."""
    return [row for row in ROWS if peft_type.upper() in row.peft_types]
