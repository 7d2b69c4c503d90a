"""Build a transformers model from a config group, or load a pretrained one. ftk writes no model code.

`build_config` maps ftk's family-neutral shape (hidden_size, num_layers, ...) onto each family's own
transformers config class; `build_model` and `load_model` return transformers' own classes, so what
ftk saves is what plain `AutoModelFor*.from_pretrained` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ftk.errors import UsageError, first_line
from ftk.schemas import Family, Objective



def build_config(m: Any, tokenizer: Any):
    """A transformers config for a model built from scratch, sized to the tokenizer actually trained."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    vocab = len(tokenizer)
    special = dict(
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    family = Family(m.family)
    inner = m.intermediate_size or 4 * m.hidden_size
    if family is Family.gpt2:
        return GPT2Config(
            vocab_size=vocab, n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_heads,
            n_inner=inner, n_positions=m.max_position_embeddings, resid_pdrop=m.dropout,
            embd_pdrop=m.dropout, attn_pdrop=m.dropout, tie_word_embeddings=m.tie_word_embeddings, **special)
    if family is Family.llama:
        return LlamaConfig(
            vocab_size=vocab, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
            intermediate_size=m.intermediate_size or _swiglu_width(m.hidden_size),
            max_position_embeddings=m.max_position_embeddings, attention_dropout=m.dropout,
            tie_word_embeddings=m.tie_word_embeddings, **special)
    cls = BertConfig if family is Family.bert else RobertaConfig
    extra = {} if family is Family.bert else {"type_vocab_size": 1}
    positions = m.max_position_embeddings + (0 if family is Family.bert else 2)  # RoBERTa offsets by pad+1
    return cls(
        vocab_size=vocab, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=inner, max_position_embeddings=positions,
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout,
        tie_word_embeddings=m.tie_word_embeddings, **special, **extra)


def _swiglu_width(hidden: int) -> int:
    """Llama's MLP width: 8/3 of hidden (same parameters as a 4x GELU MLP), rounded up to 16."""
    return (int(8 * hidden / 3) + 15) // 16 * 16


HEADS = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
         "sequence_classification": "AutoModelForSequenceClassification"}


def auto_class(objective: Any):
    """The transformers Auto class of the head objective `objective` trains (its row's `head`)."""
    import transformers

    from ftk.objectives.table import facts

    return getattr(transformers, HEADS[facts(objective).head])


def usable_positions(config: Any) -> Optional[int]:
    """How many tokens one sequence may hold: max_position_embeddings (GPT-2: n_positions), less the two
    positions RoBERTa reserves for its padding offset; None when the config does not say."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n and getattr(config, "model_type", "") == "roberta":
        n -= 2
    return n


def check_seq_len(seq_len: int, config: Any) -> None:
    """Refuse train.seq_len beyond the model's positions, before anything heavy is done with it."""
    positions = usable_positions(config)
    if positions and seq_len > positions:
        raise UsageError(f"train.seq_len={seq_len} is larger than the model's {positions} positions; "
                         f"use train.seq_len<={positions}")


def build_model(m: Any, objective: Objective, tokenizer: Any):
    """A freshly initialised transformers model of the configured family and shape (checked in schemas.validate)."""
    config = build_config(m, tokenizer)
    try:
        return auto_class(objective).from_config(config, attn_implementation=m.attn_implementation)
    except ValueError as exc:
        if "attn_implementation" not in str(exc):
            raise
        raise UsageError(f"model.attn_implementation={m.attn_implementation} is not supported by "
                         f"{type(config).__name__}: {first_line(exc, 300)}") from None


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_model_path(name_or_path: str) -> None:
    """A local path must be a model directory; anything that does not exist locally is a hub name."""
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not looks_local:
        return
    if not path.exists():
        raise UsageError(f"model.name_or_path={name_or_path} does not exist; pass a model directory "
                         "(e.g. runs/pretrain/<run>/final) or a hub name")
    if not is_model_dir(path):
        hint = " (it holds a final/ model: pass that)" if is_model_dir(path / "final") else ""
        raise UsageError(f"model.name_or_path={name_or_path} is not a model directory: no config.json{hint}")
    import json

    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # read by several loaders, each with its own traceback
        raise UsageError(f"{path / 'config.json'} is damaged ({type(exc).__name__}: {str(exc)[:80]}); save or "
                         "copy the model again") from None
    check_weight_files(path)


def check_weight_files(folder: Path) -> None:
    """Every *.safetensors in a local model or adapter folder is whole: its header parses and the file is
    exactly as long as the header says. Cheap (headers only), and it turns the SafetensorError traceback
    that transformers/peft raise deep inside loading into one line naming the file."""
    import json
    import struct

    for weights in sorted(Path(folder).glob("*.safetensors")):
        size = weights.stat().st_size
        problem = None
        try:
            with open(weights, "rb") as f:
                head = f.read(8)
                header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 2 <= header_len <= size - 8:
                    problem = f"{size:,} bytes, too short for its header"
                else:
                    header = json.loads(f.read(header_len))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                    if 8 + header_len + end != size:
                        problem = f"{size:,} bytes where its header promises {8 + header_len + end:,} (truncated?)"
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            problem = f"unreadable header ({type(exc).__name__})"
        if problem:
            raise UsageError(f"{weights} is damaged: {problem}; save or copy the model again")


def load_model(name_or_path: str, objective: Objective, *, attn_implementation: Optional[str] = None,
               trust_remote_code: bool = False, dtype: Any = None):
    """A pretrained model with the head the objective needs; weights only from safetensors by default."""
    check_model_path(name_or_path)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return auto_class(objective).from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UsageError(f"cannot load model '{name_or_path}' for objective={objective.value}: {first}") from None


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
