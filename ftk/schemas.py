"""Typed schemas behind every config group.

Each YAML option in configs/<group>/ is merged onto one of these dataclasses, so Hydra rejects an
unknown key, a wrong type or a value outside an Enum while composing, before any work starts.
`register()` puts them in Hydra's ConfigStore; the primary configs name them first in their
defaults lists. Each numeric field declares its valid range next to its default (`ranged`, checked by
ftk.ranges.check); cross-field checks that neither can express live in `validate()`.

This module imports only omegaconf/hydra (no torch) so that composing a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING

from ftk.errors import UsageError
from ftk import ranges
from ftk.objectives import table as objective_table
from ftk.ranges import SEED_MAX, ranged


class Family(str, Enum):
    """Model families ftk can build from scratch (any transformers model loads via name_or_path)."""

    gpt2 = "gpt2"
    llama = "llama"
    bert = "bert"
    roberta = "roberta"


# The objectives' names, from their table (ftk/objectives/table.py): one list, read everywhere.
Objective = Enum("Objective", {name: name for name in objective_table.NAMES}, type=str)


class Schedule(str, Enum):
    cosine = "cosine"      # linear warmup, cosine decay to min_lr_ratio * lr
    linear = "linear"      # linear warmup, linear decay to min_lr_ratio * lr
    constant = "constant"  # linear warmup, then flat


class Precision(str, Enum):
    auto = "auto"  # bf16 where the device supports it, else fp32
    fp32 = "fp32"
    bf16 = "bf16"  # autocast; weights and optimizer state stay fp32
    fp16 = "fp16"  # autocast with dynamic loss scaling (CUDA only)


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Optimizer(str, Enum):
    auto = "auto"              # fused AdamW where supported, else AdamW
    adamw = "adamw"            # torch AdamW (foreach)
    adamw_fused = "adamw_fused"  # torch AdamW(fused=True): one kernel for all parameters
    adamw_8bit = "adamw_8bit"  # bitsandbytes 8-bit AdamW: ~4x smaller optimizer state


class Strategy(str, Enum):
    auto = "auto"  # ddp when launched with several processes, else single process
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class OnNonFinite(str, Enum):
    stop = "stop"  # stop the run, naming the step (no checkpoint with non-finite weights is written)
    skip = "skip"  # drop the batch and go on, up to train.max_skipped_batches


@dataclass
class ModelConfig:
    # A local Hugging Face model directory (e.g. runs/pt/final) or a hub name. null builds the model from
    # scratch from the shape below (and trains a tokenizer). Every model option sets it: a value that
    # is missing (model=pretrained without model.name_or_path) stops the run with a clear error.
    name_or_path: Optional[str] = MISSING
    family: Family = Family.gpt2
    hidden_size: int = ranged(256, ge=1)
    num_layers: int = ranged(4, ge=1)
    num_heads: int = ranged(4, ge=1)
    num_kv_heads: Optional[int] = ranged(None, ge=1)  # llama only: grouped-query attention; None = num_heads
    intermediate_size: Optional[int] = ranged(None, ge=1)  # MLP width; None = 4 * hidden_size (llama: 8/3, rounded)
    max_position_embeddings: int = ranged(512, ge=2)  # longest sequence the model can see; train.seq_len must fit
    vocab_size: int = ranged(8192, ge=1)  # size of the tokenizer trained from scratch
    dropout: float = ranged(0.0, ge=0, lt=1)  # 0 for pretraining at this scale; 0.1 is BERT's original
    tie_word_embeddings: bool = True         # share input and output embeddings (GPT-2 and BERT do)
    tokenizer: Optional[str] = None          # reuse this tokenizer (dir or hub name) instead of training one
    attn_implementation: str = "sdpa"        # sdpa (fused, default) | eager | flash_attention_2 (CUDA)
    trust_remote_code: bool = False          # never run code from a model repo unless you opt in
    random_init: bool = False                # finetune: the base's architecture and tokenizer with freshly
                                             # initialised weights (seeded): the from-scratch control arm


@dataclass
class DataConfig:
    # A file (.txt .jsonl .json .csv .tsv .parquet, plain or .gz/.zst), a folder of them, a glob, or a hub dataset.
    # null: the embedded default corpus (docstrings of this Python's standard library; no download).
    # Every data option sets it (data=default to null); a missing one stops the run with a clear error.
    path: Optional[str] = MISSING
    validation_path: Optional[str] = None  # held-out file/folder/name; unset = hold out a share of documents
    validation_fraction: float = ranged(0.05, gt=0, lt=1)  # share of documents held out when validation_path is unset
    text_column: str = "text"              # column holding the text in jsonl/csv/parquet/hub data
    label_column: str = "label"            # finetune objective=classification: column holding the class
    instruction_column: str = "instruction"  # finetune objective=sft: the instruction ...
    input_column: str = "input"            # ... an optional input (context) ...
    response_column: str = "output"        # ... and the response (Alpaca's `output`; `response` also found)
    # finetune: several examples per row of up to train.seq_len tokens, attention kept inside each example
    # (ftk.data.packing); null = on where it applies (objective=sft, not prompt tuning), true where it cannot is
    # an error
    packing: Optional[bool] = None
    # preference objectives (dpo, simpo, orpo, reward): the prompt (absent: chosen and rejected are whole
    # dialogues sharing it, as in Anthropic HH), the preferred and the other response, and for reward models an
    # optional column of margins (how much better chosen is); text or chat message lists
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    margin_column: Optional[str] = None
    hub_config: Optional[str] = None       # hub datasets only: configuration name (e.g. wikitext-2-raw-v1)
    split: str = "train"                   # hub datasets only: split to train on
    validation_split: Optional[str] = None  # hub datasets only: split to validate on (e.g. validation)
    max_documents: Optional[int] = ranged(None, ge=1)  # use only the first N documents (quick experiments)
    # finetune classification: a seeded (train.seed), class-stratified sample of N training records, for learning
    # curves; null = all
    train_examples: Optional[int] = ranged(None, ge=1)
    test_path: Optional[str] = None        # finetune classification: a test file scored once, with the final
                                           # (or best) model, after training: test_accuracy in summary.json
    cache_dir: Optional[str] = None        # tokenized-data cache; unset = $FTK_CACHE or ~/.cache/ftk
    # processes tokenizing a pretraining corpus (same tokens whatever the number); unset = the machine's cores
    num_proc: Optional[int] = ranged(None, ge=1)
    streaming: bool = False                # hub datasets: stream the split instead of downloading it whole


@dataclass
class TrainConfig:
    max_steps: int = ranged(1000, ge=1)  # optimizer steps
    # stop (saving final/) after this much wall time; unset = no limit
    max_minutes: Optional[float] = ranged(None, gt=0)
    batch_size: int = ranged(16, ge=1)  # sequences per optimizer step, over all devices (the global batch)
    seq_len: int = ranged(256, ge=2)  # tokens per sequence; must fit model.max_position_embeddings
    lr: Optional[float] = ranged(3e-4, gt=0)  # peak learning rate; finetune: null = the regime's default (regime.lr)
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)  # final lr = min_lr_ratio * lr (cosine/linear)
    warmup_steps: int = ranged(100, ge=0)  # linear warmup from 0
    schedule: Schedule = Schedule.cosine
    weight_decay: float = ranged(0.1, ge=0)  # decoupled (AdamW); not applied to biases and norms
    beta1: float = ranged(0.9, ge=0, lt=1)
    beta2: float = ranged(0.95, ge=0, lt=1)  # 0.95 is the GPT-3/Llama choice; 0.999 is torch's default
    eps: float = ranged(1e-8, gt=0)
    max_grad_norm: float = ranged(1.0, ge=0)  # gradient clipping; 0 disables it
    log_every: int = ranged(10, ge=1)  # steps between metrics.jsonl lines
    eval_every: int = ranged(200, ge=0)  # steps between validations; 0 = only at the end
    eval_batches: int = ranged(20, ge=0)  # validation batches per evaluation (0 = the whole validation set)
    save_every: int = ranged(500, ge=0)  # steps between checkpoints; 0 = only final/
    keep_last: int = ranged(2, ge=1)  # checkpoints kept; older ones are removed after a new one is complete
    seed: int = ranged(0, ge=0, le=SEED_MAX)  # seeds init, data order and masking: the same seed gives the same losses
    resume: str = "never"          # never | auto (newest complete checkpoint in the run dir) | a checkpoint dir
    accept_changes: bool = False   # resume with other model/data/objective/regime/optimizer/batch settings than the
                                   # checkpoint's: applied from its step on, recorded in resumes.jsonl
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    max_skipped_batches: int = ranged(10, ge=1)  # with on_nonfinite=skip: stop after this many skipped batches
    # stop after this many validations without a better loss, keeping the best model as final/; 0 = train all steps
    early_stopping_patience: int = ranged(0, ge=0)


@dataclass
class HardwareConfig:
    name: str = "auto"
    device: Device = Device.auto
    precision: Precision = Precision.auto
    # sequences per forward per device; the rest is gradient accumulation
    micro_batch_size: Optional[int] = ranged(None, ge=1)
    gradient_checkpointing: bool = False    # recompute activations in backward: less memory, ~30% more compute
    optimizer: Optimizer = Optimizer.auto
    compile: Optional[bool] = None          # torch.compile the model; None = on for runs long enough to pay off
    compile_backend: str = "inductor"       # torch.compile backend: inductor (fast kernels), aot_eager or eager
                                            # (no code generation: what the CPU tests use to exercise compile)
    matmul_attention: Optional[bool] = None  # CPU bf16: attention as bf16 matmuls, not torch's slower CPU flash
                                             # kernel (see ftk.cpu_attention); None = on wherever that applies
    strategy: Strategy = Strategy.auto
    num_threads: Optional[int] = ranged(None, ge=1)  # CPU threads for torch; None = torch's default (all cores)
    # multi-process: how long a collective (or the barrier while rank 0 prepares the data or writes a
    # checkpoint) may wait before the run fails; NCCL's own default is 10 minutes
    timeout_minutes: float = ranged(60.0, gt=0)
    # per device; None = detected (GPU memory, or 80% of RAM on CPU)
    memory_budget_gb: Optional[float] = ranged(None, gt=0)
    check_memory: bool = True               # run the memory planner before loading and stop if the run cannot fit


@dataclass
class ForgettingConfig:
    """How much general knowledge survives fine-tuning, and what holds it."""

    data_path: Optional[str] = None     # general text: perplexity of base and fine-tuned model on it
    max_blocks: int = ranged(64, ge=1)  # blocks of train.seq_len tokens evaluated from data_path
    replay_fraction: float = ranged(0.0, ge=0, lt=1)  # share of each batch drawn from replay data (LM loss on it)
    replay_path: Optional[str] = None   # replay text; null = the base run's pretraining data (or data_path)
    l2sp: float = ranged(0.0, ge=0)  # L2-SP: alpha/2 * ||w - w_pretrained||^2 on trainable pretrained weights


@dataclass
class TensorBoardLogger:
    enabled: bool = False     # event files in <run>/tensorboard: `tensorboard --logdir runs/`


@dataclass
class WandbLogger:
    enabled: bool = False
    project: str = "ftk"
    mode: str = "offline"     # offline (files in <run>/wandb; `wandb sync` uploads them) | online | disabled
    entity: Optional[str] = None


@dataclass
class MlflowLogger:
    enabled: bool = False
    # null: $MLFLOW_TRACKING_URI if set, else a local store in the run, sqlite:///<run>/mlflow.db
    # (`mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db`); or a server, http://host:5000
    tracking_uri: Optional[str] = None
    experiment: str = "ftk"


@dataclass
class TrackioLogger:
    enabled: bool = False     # trackio's local store (~/.cache/huggingface/trackio): `trackio show`
    project: str = "ftk"


@dataclass
class LoggerConfig:
    """Experiment trackers, beside metrics.jsonl (always written). Each option of the `logger` group turns one on;
    several at once: `logger=[tensorboard,mlflow]` (Hydra's list of group options)."""

    tensorboard: TensorBoardLogger = field(default_factory=TensorBoardLogger)
    wandb: WandbLogger = field(default_factory=WandbLogger)
    mlflow: MlflowLogger = field(default_factory=MlflowLogger)
    trackio: TrackioLogger = field(default_factory=TrackioLogger)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # One schema per objective (ftk/objectives/table.py), chosen by the `objective` group.
    objective: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class FinetuneConfig(PretrainConfig):
    """Pretrain's groups, plus how much trains (regime) and what must survive (forgetting)."""

    # One schema per regime (ftk/regimes/table.py), chosen by the `regime` group: a key of another regime is
    # refused while composing.
    regime: Any = MISSING
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (called by each recipe before Hydra composes)."""
    from hydra.core.config_store import ConfigStore

    from ftk.paths import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)
    from ftk.regimes.table import ROWS

    for row in ROWS:
        cs.store(group="regime", name=f"{row.name}_schema", node=row.settings)
    cs.store(group="model", name="schema", node=ModelConfig)
    for row in objective_table.ROWS:
        cs.store(group="objective", name=f"{row.name}_schema", node=row.settings)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="train", name="schema", node=TrainConfig)
    cs.store(group="hardware", name="schema", node=HardwareConfig)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def validate(cfg: Any) -> None:
    """Checks across fields that types cannot express; raises UsageError naming the key and fix."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    _require(not missing, f"{missing[0] if missing else ''} is required: pass {missing[0] if missing else ''}=...")
    ranges.check(cfg)  # every numeric field against the range declared next to its default
    if "logger" in cfg:
        from ftk import trackers

        trackers.require(cfg.logger)  # a chosen tracker that is not installed stops here, before any work
    t, m, o = cfg.train, cfg.model, cfg.objective
    _require(t.lr is not None or "regime" in cfg, "train.lr is required: pass train.lr=...")
    if m.name_or_path is None and "regime" not in cfg:  # built from scratch (finetune: null = newest run)
        _require(t.seq_len <= m.max_position_embeddings,
                 f"train.seq_len={t.seq_len} is larger than model.max_position_embeddings="
                 f"{m.max_position_embeddings}; lower train.seq_len or raise model.max_position_embeddings")
        _require(m.hidden_size % m.num_heads == 0,
                 f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; pick a "
                 "hidden_size that is a multiple of num_heads")
        if Family(m.family) is Family.llama:  # rotary embeddings rotate pairs; grouped-query heads share kv heads
            _require((m.hidden_size // m.num_heads) % 2 == 0,
                     f"model.hidden_size / model.num_heads = {m.hidden_size // m.num_heads} must be even for llama "
                     "(rotary embeddings rotate pairs of dimensions)")
            kv = m.num_kv_heads or m.num_heads
            _require(kv <= m.num_heads and m.num_heads % kv == 0,
                     f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={kv}; pick "
                     "num_kv_heads that divides num_heads")
        encoder = Family(m.family) in (Family.bert, Family.roberta)
        if not objective_table.fits(o.name, encoder):
            kind, fix = (("an encoder", "objective=mlm, or a decoder (model=gpt-tiny, model=llama-tiny)") if encoder
                         else ("a decoder", "objective=clm, or an encoder (model=bert-tiny, model=bert-small)"))
            raise UsageError(f"model.family={Family(m.family).value} is {kind} and cannot be trained with "
                             f"objective={o.name}; use {fix}")
    if "mask_replace_prob" in o:
        _require(o.mask_replace_prob + o.random_replace_prob <= 1.0,
                 "objective.mask_replace_prob + objective.random_replace_prob must be at most 1")
    resume = str(t.resume)
    _require(resume in ("never", "auto") or bool(resume), "train.resume must be never, auto or a checkpoint dir")
    _require(objective_table.facts(o.name).pretraining or "regime" in cfg,
             f"objective={o.name} is a fine-tuning objective; use `ftk finetune objective={o.name}`")


def validate_finetune(cfg: Any) -> None:
    """validate() plus the fine-tuning fields."""
    from ftk.regimes.table import facts

    validate(cfg)
    r, f = cfg.regime, cfg.forgetting
    d = cfg.data
    classification = objective_table.facts(cfg.objective.name).data == "labelled"
    for key in ("train_examples", "test_path"):
        _require(getattr(d, key) is None or classification,
                 f"data.{key} applies to objective=classification only; drop it, or score other objectives "
                 "with `ftk evaluate`")
    o = cfg.objective
    _require(not (o.get("loss") == "ipo" and o.get("label_smoothing")),
             "objective.label_smoothing applies to objective.loss=sigmoid (conservative DPO), not ipo; drop it")
    _require(d.margin_column is None or o.name == "reward",
             f"data.margin_column applies to objective=reward only, not {o.name}; drop it")
    if cfg.model.random_init:
        _require(not (f.data_path or f.replay_fraction or f.l2sp),
                 "model.random_init=true has no pretrained knowledge to forget or keep; drop forgetting.data_path, "
                 "forgetting.replay_fraction and forgetting.l2sp for the from-scratch arm")
        _require(not facts(r.name).quantized,
                 f"model.random_init=true with regime={r.name} would quantize random weights; use regime=lora")


@dataclass
class MergeModelConfig:
    """`ftk merge-adapter model.name_or_path=...`: the base to merge into, when not the adapter's own."""

    name_or_path: Optional[str] = None  # null: base_model_name_or_path of the adapter's adapter_config.json
    trust_remote_code: bool = False     # never run code from a model repo unless you opt in


@dataclass
class MergeConfig:
    """`ftk merge-adapter`: a LoRA/QLoRA adapter merged into its base, written as a standalone HF model."""

    adapter_path: Optional[str] = None  # a finetune run's final/ (adapter_config.json); null = the newest one
    output_dir: Optional[str] = None    # null: <adapter run dir>/merged
    model: MergeModelConfig = field(default_factory=MergeModelConfig)
    dtype: str = "fp32"                 # weights of the merged model: fp32 | bf16 | fp16
    # max |logit difference| merged vs base+adapter; null = 1e-4 (fp32), 1e-2 (bf16/fp16)
    tolerance: Optional[float] = ranged(None, gt=0)
    overwrite: bool = False             # replace an earlier merge in output_dir (files it did not write stay)
    allow_other_base: bool = False      # merge into a base whose weights are not those the adapter was trained on
    probe_batches: int = ranged(2, ge=1)  # batches of seeded random token ids the merged model is checked on
    probe_len: int = ranged(32, ge=2)  # tokens per probe sequence (capped by the model's positions)
    seed: int = ranged(0, ge=0, le=SEED_MAX)  # seeds the probe inputs


def register_merge() -> None:
    """Put MergeConfig in Hydra's ConfigStore as `merge_schema` (named first in configs/merge-adapter.yaml)."""
    from hydra.core.config_store import ConfigStore

    from ftk.paths import register_resolvers

    register_resolvers()  # ${ftk_now:...} names its run folder
    ConfigStore.instance().store(name="merge_schema", node=MergeConfig)
