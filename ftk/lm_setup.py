"""Language-model steps shared by pretraining and continued pretraining: text, tokenizer, blocks, model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from ftk.data import lm
from ftk.errors import UsageError, first_line
from ftk.schemas import Family, Objective

Say = Callable[[str], None]


def check_pretrained(cfg: Any) -> None:
    """Before any data work: a given model must be a model, and its positions must hold train.seq_len
    (reads config.json only)."""
    m = cfg.model
    if not m.name_or_path:
        return
    from ftk.models import check_model_path, check_seq_len

    check_model_path(m.name_or_path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UsageError(f"cannot read the config of model '{m.name_or_path}': {first}") from None
    check_seq_len(cfg.train.seq_len, config)


def load_text(cfg: Any, say: Say) -> lm.TextSplits:
    splits = lm.load_splits(cfg.data, cfg.train.seed)
    held = "given" if cfg.data.validation_path or cfg.data.validation_split else "held out"
    say(f"data: {splits.description}: {len(splits.train):,} training documents, "
        f"{len(splits.validation or []):,} validation documents ({held})")
    return splits


def tokenizer_for(cfg: Any, splits: lm.TextSplits, resume_from: Optional[Path], say: Say) -> Tuple[Any, str]:
    """The run's tokenizer and its fingerprint: the checkpoint's, a given one, or one trained (and cached)."""
    from ftk.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

    m = cfg.model
    if resume_from is not None:
        tok = load_tokenizer(str(resume_from / "model"))
    elif m.tokenizer or m.name_or_path:
        tok = load_tokenizer(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)
        say(f"tokenizer: {m.tokenizer or m.name_or_path} ({len(tok):,} tokens)")
    else:
        key = hashlib.sha256(json.dumps({"data": splits.fingerprint, "family": Family(m.family).value,
                                         "vocab": m.vocab_size, "max_len": m.max_position_embeddings,
                                         "v": 1}).encode()).hexdigest()[:32]
        cached = lm.cache_root(cfg.data.cache_dir) / "tokenizers" / key
        tok = None
        if (cached / "tokenizer.json").is_file():
            try:
                tok = load_tokenizer(str(cached))
                say(f"tokenizer: cached {Family(m.family).value} tokenizer ({len(tok):,} tokens) from {cached}")
            except UsageError:  # a damaged cache entry (truncated tokenizer.json, ...): train it again
                say(f"tokenizer cache: {cached} is damaged; training the tokenizer again")
                shutil.rmtree(cached, ignore_errors=True)
        if tok is None:
            tok = train_tokenizer(splits.train, Family(m.family), m.vocab_size, m.max_position_embeddings)
            tmp = cached.with_name(cached.name + ".tmp")
            tok.save_pretrained(tmp)
            try:
                tmp.replace(cached)
            except OSError:  # another process cached the same tokenizer first
                shutil.rmtree(tmp, ignore_errors=True)
            say(f"tokenizer: trained a {Family(m.family).value} tokenizer of {len(tok):,} tokens on the "
                "training text")
    return tok, tokenizer_fingerprint(tok)


def pack(cfg: Any, splits: lm.TextSplits, tokenizer: Any, tokenizer_fp: str, say: Say) -> lm.PackedData:
    packed = lm.packed_blocks(splits, tokenizer, cfg.train.seq_len, Objective(cfg.objective.name).value,
                              cfg.data.cache_dir, tokenizer_fp, say)
    n_tokens = packed.train.size
    say(f"blocks: {len(packed.train):,} training x {cfg.train.seq_len} tokens ({n_tokens:,} tokens), "
        f"{len(packed.validation):,} validation" + (" (from cache)" if packed.cache_hit else ""))
    return packed


def model_for(cfg: Any, tokenizer: Any, resume_from: Optional[Path], say: Say) -> Any:
    """A new model of the configured shape, or the pretrained one; checked against tokenizer and seq_len."""
    from ftk.models import build_model, check_seq_len, load_model

    m, objective = cfg.model, Objective(cfg.objective.name)
    if m.name_or_path:
        import torch

        model = load_model(m.name_or_path, objective, attn_implementation=m.attn_implementation,
                           trust_remote_code=m.trust_remote_code, dtype=torch.float32)  # float32 master weights
    else:
        model = build_model(m, objective, tokenizer)
    check_seq_len(cfg.train.seq_len, model.config)  # a model built from options, or one given at load time
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding has {vocab:,}: "
                         "they do not belong together; pass the model's own tokenizer (model.tokenizer=...)")
    if cfg.hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def objective_for(cfg: Any, tokenizer: Any) -> Any:
    from ftk.objectives import get_objective

    return get_objective(cfg.objective, tokenizer)
