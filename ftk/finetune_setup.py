"""The steps of `ftk finetune` before the loop: which base, which data, which model with which head."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ftk import runs
from ftk.errors import UsageError, first_line
from ftk.models import auto_class, check_seq_len
from ftk.objectives.table import NAMES, fits, language_objective
from ftk.regimes.table import facts
from ftk.schemas import Objective

Say = Callable[[str], None]


def choose_base(name_or_path: Optional[str]) -> Tuple[str, str]:
    """(base model, how it was chosen). Unset: the newest finished `ftk pretrain` run under ./runs."""
    if name_or_path:
        from ftk.models import check_model_path

        check_model_path(name_or_path)
        path = Path(name_or_path).expanduser()
        # An absolute path, so the adapter's base_model_name_or_path loads from any directory.
        return (str(path.resolve()) if path.exists() else name_or_path), "given"
    newest = runs.newest_pretrained()
    if newest is None:
        raise UsageError("no model given and no finished `ftk pretrain` run under ./runs; run "
                         "`ftk pretrain +recipe=gpt-tiny` first, or pass model.name_or_path=<model dir or hub name>")
    from ftk.models import check_weight_files

    check_weight_files(newest)
    return str(newest.resolve()), "the newest pretrain run"


def padding_side(objective: Objective, regime: str, config: Any) -> str:
    """Right padding keeps positions exact; but a decoder classifier fed a soft prompt gets inputs_embeds and
    can no longer find its last real token, so it reads the last position: then pad on the left."""
    if _scores_sequences(objective) and facts(regime).left_pad_decoder_classifier and not is_encoder(config):
        return "left"
    return "right"


def _scores_sequences(objective: Objective) -> bool:
    """Its head is a sequence classifier (classification, reward models)."""
    from ftk.objectives.table import facts as objective_facts

    return objective_facts(objective).head == "sequence_classification"


def is_encoder(config: Any) -> bool:
    """BERT-like models (a masked-LM head exists for them, a causal one is not their nature)."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING

    return type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False) and \
        config.model_type not in ("llama", "gpt2", "mistral", "qwen2", "gemma")


def lm_objective(config: Any) -> Objective:
    """The objective the model's language-model head trains with (mlm for encoders, clm for decoders)."""
    return Objective(language_objective(is_encoder(config)))


@dataclass
class TaskData:
    source: Any                     # ftk.train.Source
    description: str
    labels: List[str] = field(default_factory=list)
    n_train: int = 0
    n_validation: int = 0
    append_eos: bool = False
    test: Optional[Any] = None      # data.test_path as a source whose validation batches are the test set
    stats: dict = field(default_factory=dict)  # what loading counted (dropped, truncated), for summary.json


def task_data(cfg: Any, objective: Objective, tokenizer: Any, config: Any, say: Say,
              padding_side: str = "right") -> TaskData:
    """The training and validation data of `objective`, read as its row says (ftk/objectives/table.py)."""
    from ftk.objectives.table import facts as objective_facts

    from ftk.data.packing import packing_on

    kind = objective_facts(objective).data
    # decided once, here, for every objective: data.packing=true where packing cannot apply stops the run
    pack = packing_on(cfg.data.get("packing"), getattr(objective, "value", objective), cfg.regime.name)
    if kind == "labelled":
        return _labelled_data(cfg, tokenizer, config, say, padding_side)
    if kind == "instructions":
        return _sft_data(cfg, tokenizer, say, pack)
    if kind == "preferences":
        from ftk.preference_setup import preference_data

        return preference_data(cfg, objective, tokenizer, config, say, padding_side)
    return _text_data(cfg, tokenizer, say)


def _labelled_data(cfg: Any, tokenizer: Any, config: Any, say: Say, padding_side: str) -> TaskData:
    from ftk.data import lm
    from ftk.data.examples import ExampleSource

    seq_len = cfg.train.seq_len
    from ftk.data.corpus import embedded_task_paths
    from ftk.data.labelled import load_labelled, load_test, tokenize

    defaults = None
    if cfg.data.path is None:
        defaults = tuple(str(p) for p in embedded_task_paths(lm.cache_root(cfg.data.cache_dir)))
    splits = load_labelled(cfg.data, cfg.train.seed, defaults)
    append_eos = not is_encoder(config) and tokenizer.eos_token_id is not None and \
        tokenizer.pad_token_id != tokenizer.eos_token_id
    train = tokenize(splits.train, splits.labels, tokenizer, seq_len, append_eos)
    validation = tokenize(splits.validation, splits.labels, tokenizer, seq_len, append_eos)
    test = None
    if cfg.data.test_path:  # read now, so a bad test file stops the run before training, not after
        test_examples = tokenize(load_test(cfg.data, splits.labels), splits.labels, tokenizer, seq_len, append_eos)
        test = ExampleSource([], test_examples, tokenizer.pad_token_id, padding_side)
    say(f"data: {splits.description}: {len(train):,} training / {len(validation):,} validation"
        + (f" / {len(test.validation):,} test" if test else "") + " examples, "
        f"{len(splits.labels)} classes ({', '.join(splits.labels[:8])}{', ...' if len(splits.labels) > 8 else ''})")
    return TaskData(ExampleSource(train, validation, tokenizer.pad_token_id, padding_side), splits.description,
                    splits.labels, len(train), len(validation), append_eos, test)


def _text_data(cfg: Any, tokenizer: Any, say: Say) -> TaskData:
    from ftk import lm_setup
    from ftk.data.tokenizer import tokenizer_fingerprint
    from ftk.train import BlockSource

    corpus = lm_setup.load_text(cfg, say)
    packed = lm_setup.pack(cfg, corpus, tokenizer, tokenizer_fingerprint(tokenizer), say).packed
    return TaskData(BlockSource(packed.train, packed.validation), corpus.description,
                    n_train=len(packed.train), n_validation=len(packed.validation))


def hold_out(examples: List[Any], fraction: float, seed: int) -> Tuple[List[Any], List[Any]]:
    """(training, validation) examples: a seeded random `fraction` (at least one) held out, order kept."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:max(1, int(round(len(examples) * fraction)))].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def train_and_validation(load: Callable[[str, Optional[str]], Tuple[List[Any], Dict[str, Any]]], d: Any,
                         seed: int) -> Tuple[List[Any], List[Any], Dict[str, Any]]:
    """(training, validation, stats) examples of data.path (at most data.max_documents): the validation ones
    from data.validation_path, or a held-out share of the training file. `load(path, split)` reads one file."""
    train, stats = load(d.path, d.split)
    if d.max_documents:
        train = train[: d.max_documents]
    if d.validation_path:
        validation, _ = load(d.validation_path, d.validation_split or d.split)
    else:
        train, validation = hold_out(train, d.validation_fraction, seed)
    return train, validation, stats


def _sft_data(cfg: Any, tokenizer: Any, say: Say, pack: bool) -> TaskData:
    from ftk.data.examples import ExampleSource
    from ftk.data.instructions import dropped_note, load_instruction_examples

    d = cfg.data
    if d.path is None:
        raise UsageError("objective=sft needs instruction data: pass data.path=<.json/.jsonl of instruction, "
                         "input, output records>")
    columns = dict(instruction_column=d.instruction_column, input_column=d.input_column,
                   response_column=d.response_column, hub_config=d.hub_config)
    train, validation, stats = train_and_validation(
        lambda path, split: load_instruction_examples(path, tokenizer, cfg.train.seq_len, split=split, **columns),
        d, cfg.train.seed)
    if not train:
        raise UsageError(f"{d.path}: no instruction record fits train.seq_len={cfg.train.seq_len}; raise it")
    pack_to = cfg.train.seq_len if pack else None
    say(f"data: {d.path}: {len(train):,} training / {len(validation):,} validation instruction examples"
        + dropped_note(stats))
    if pack_to:
        say(f"packing: several examples per row of up to {pack_to} tokens, attention inside each "
            "(data.packing=false for one example per row)")
    return TaskData(ExampleSource(train, validation, tokenizer.pad_token_id, pack_to=pack_to), d.path,
                    n_train=len(train), n_validation=len(validation))


def load_tokenizer(base: str, trust_remote_code: bool) -> Any:
    from ftk.data.tokenizer import load_tokenizer as load

    tokenizer = load(base, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # e.g. hub GPT-2: pad with end-of-text (the mask keeps it out of the loss)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_fits_model(base: str, objective: Objective, config: Any) -> None:
    """Refuse an objective the model cannot train (a causal-LM objective on an encoder, and the reverse)."""
    encoder = is_encoder(config)
    if not fits(objective, encoder):
        kind = "an encoder" if encoder else "a decoder"
        fitting = " or ".join(name for name in NAMES if fits(name, encoder))
        raise UsageError(f"{base} is {kind} ({config.model_type}) and cannot be trained with "
                         f"objective={objective.value}; use objective={fitting}")


def load_task_model(cfg: Any, base: str, objective: Objective, regime: str, tokenizer: Any, labels: List[str],
                    config: Any, precision: str = "fp32", device: str = "cpu") -> Tuple[Any, List[str]]:
    """The base with the head the objective needs; returns (model, names of freshly initialised parameters)."""
    check_fits_model(base, objective, config)
    kwargs: dict = {"trust_remote_code": cfg.model.trust_remote_code, "output_loading_info": True}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if _scores_sequences(objective):  # reward models: one label, the score
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
    cls = auto_class(objective)
    try:
        if facts(regime).quantized:
            from ftk.regimes.qlora_base import load_4bit_base

            from ftk.hardware import qlora_compute_dtype, torch_dtype

            compute = qlora_compute_dtype(cfg.regime.compute_dtype.value, precision)
            # Where the plan says (hardware=cpu on a GPU machine keeps it on the CPU), not wherever CUDA is.
            placement = {"": "cpu"} if device == "cpu" else None
            model, info = load_4bit_base(base, cls, torch_dtype(compute), quant_type=cfg.regime.quant_type.value,
                                         **({"device_map": placement} if placement else {}), **kwargs)
        else:
            model, info = cls.from_pretrained(base, dtype=weights_dtype(regime, precision), **kwargs)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UsageError(f"cannot load model '{base}' for objective={objective.value}: {first}") from None
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding has {vocab:,}; "
                         "pass the model's own tokenizer (model.tokenizer=...)")
    check_seq_len(cfg.train.seq_len, model.config)  # RoBERTa's reserved positions included
    new_head = sorted(set(info.get("missing_keys", [])))
    if cfg.model.random_init:
        reinitialise(model)
    if cfg.hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, new_head


def reinitialise(model: Any) -> None:
    """Every weight drawn afresh by the architecture's own initialiser: the same model, config, head and
    tokenizer as the pretrained arm, minus what pretraining learned. Seeded: session.start set train.seed."""
    fresh = type(model)(model.config)
    model.load_state_dict(fresh.state_dict())  # copies into the loaded dtype (bf16 under adapters)


def weights_dtype(regime: str, precision: str):
    """float32 whatever the checkpoint's dtype (transformers 5 would keep a float16 hub checkpoint in float16):
    AdamW needs float32 weights and moments, and bf16/fp16 precision is autocast on top. Except a base that
    stays frozen under adapters (LoRA, prompt tuning): with bf16/fp16 it is held in that dtype, half the
    memory; what trains is cast back to float32 after the regime is applied (see `trainable_in_float32`)."""
    import torch

    if facts(regime).frozen_in_16bit and precision in ("bf16", "fp16"):
        from ftk.hardware import torch_dtype

        return torch_dtype(precision)
    return torch.float32


def trainable_in_float32(model: Any) -> None:
    """Adapters, soft prompts and new heads train in float32 even on a 16-bit frozen base."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def load_base_lm(base: str, config: Any, trust_remote_code: bool, dtype: Any = None) -> Any:
    """The base checkpoint with its language-model head (for forgetting and replay), in `dtype` (None: float32)."""
    import torch

    return auto_class(lm_objective(config)).from_pretrained(base, trust_remote_code=trust_remote_code,
                                                            dtype=dtype or torch.float32)


def general_blocks(path: str, tokenizer: Any, seq_len: int, objective: Objective, limit: Optional[int],
                   cache_dir: Optional[str]):
    """General text (file, folder, hub name; None = the embedded corpus) packed into blocks."""
    from ftk.data import lm, sources
    from ftk.data.corpus import embedded_corpus_path

    if path is None:
        path = str(embedded_corpus_path(lm.cache_root(cache_dir)))
    docs = sources.text_column(sources.load_records(path), "text", path)
    layout = lm.Layout.for_objective(objective.value, tokenizer)
    blocks = lm.pack(docs, tokenizer, seq_len, layout)
    if len(blocks) == 0:
        raise UsageError(f"{path} holds fewer than train.seq_len={seq_len} tokens; give more general text")
    return blocks[:limit] if limit else blocks
