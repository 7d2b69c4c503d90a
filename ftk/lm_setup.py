"""Language-model steps shared by pretraining and continued pretraining: text, tokenizer, blocks, model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Tuple

from ftk.data import lm, stream
from ftk.errors import UsageError, first_line
from ftk.schemas import Family, Objective

if TYPE_CHECKING:
    from ftk.data import prepare

Say = Callable[[str], None]
TOKENIZER_SAMPLE_CHARS = 256_000_000  # text a new tokenizer is trained on, at most (streamed, never held)


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


def first_rank_say() -> Say:
    """Printing before accelerate starts: only the process of rank 0 (RANK, as torchrun and accelerate set it)."""
    import os

    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    rank = int(os.environ.get("RANK", "0") or 0)

    def say(text: str) -> None:
        if rank == 0:
            console.print(text)

    return say


def load_text(cfg: Any, say: Say) -> stream.Corpus:
    """The configured corpus, as a stream: files are listed here, no document is read."""
    corpus = stream.resolve(cfg.data, cfg.train.seed)
    held = ("given" if corpus.validation is not None
            else f"{cfg.data.validation_fraction:.0%} of documents held out")
    say(f"data: {corpus.description} ({corpus.train.describe()}; validation {held})")
    return corpus


def tokenizer_sample(corpus: stream.Corpus, max_chars: int = TOKENIZER_SAMPLE_CHARS) -> Iterator[str]:
    """The training documents a new tokenizer learns from: held-out ones left out, at most `max_chars` of text
    (the first ones, streamed): merges learnt from a few hundred MB are as good as from the whole corpus."""
    from ftk.data import prepare

    chars, skipped = 0, []
    for texts, split, target in prepare.batches(corpus):
        if target != "train":
            break
        for text in texts:
            if split and stream.held_out(text, corpus.seed, corpus.validation_fraction):
                if not chars and len(skipped) < 1000:
                    skipped.append(text)
                continue
            yield text
            chars += len(text)
            if chars >= max_chars:
                return
    if not chars:  # every document held out (one text repeated): the preparation trains on them all, so may this
        yield from skipped


def tokenizer_for(cfg: Any, corpus: stream.Corpus, resume_from: Optional[Path], say: Say) -> Tuple[Any, str]:
    """The run's tokenizer and its fingerprint: the checkpoint's, a given one, or one trained (and cached)."""
    from ftk.data.prepare import preparer_lock
    from ftk.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

    m = cfg.model
    if resume_from is not None:
        tok = load_tokenizer(str(resume_from / "model"))
    elif m.tokenizer or m.name_or_path:
        tok = load_tokenizer(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)
        say(f"tokenizer: {m.tokenizer or m.name_or_path} ({len(tok):,} tokens)")
    else:
        root = lm.cache_root(cfg.data.cache_dir)
        key = hashlib.sha256(json.dumps({"data": corpus.fingerprint(root), "family": Family(m.family).value,
                                         "vocab": m.vocab_size, "max_len": m.max_position_embeddings,
                                         "sample": TOKENIZER_SAMPLE_CHARS, "v": 2}).encode()).hexdigest()[:32]
        cached = root / "tokenizers" / key
        with preparer_lock(cached.with_name(key + ".lock"), say, f"tokenizer {cached}"):
            tok = _cached_tokenizer(cached, m, say)
            if tok is None:
                tok = train_tokenizer(tokenizer_sample(corpus), Family(m.family), m.vocab_size,
                                      m.max_position_embeddings)
                tmp = cached.with_name(cached.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tok.save_pretrained(tmp)
                try:
                    tmp.replace(cached)
                except OSError:  # another process cached the same tokenizer first
                    shutil.rmtree(tmp, ignore_errors=True)
                say(f"tokenizer: trained a {Family(m.family).value} tokenizer of {len(tok):,} tokens on the "
                    "training text")
    return tok, tokenizer_fingerprint(tok)


def _cached_tokenizer(cached: Path, m: Any, say: Say) -> Any:
    from ftk.data.tokenizer import load_tokenizer

    if not (cached / "tokenizer.json").is_file():
        return None
    try:
        tok = load_tokenizer(str(cached))
    except UsageError:  # a damaged cache entry (truncated tokenizer.json, ...): train it again
        say(f"tokenizer cache: {cached} is damaged; training the tokenizer again")
        shutil.rmtree(cached, ignore_errors=True)
        return None
    say(f"tokenizer: cached {Family(m.family).value} tokenizer ({len(tok):,} tokens) from {cached}")
    return tok


def pack(cfg: Any, corpus: stream.Corpus, tokenizer: Any, tokenizer_fp: str, say: Say,
         progress: bool = True) -> "prepare.Prepared":
    """The corpus's blocks, from the token cache or prepared into it now (streaming; data.num_proc processes)."""
    import os

    from ftk.data import prepare

    prepared = prepare.prepare(corpus, tokenizer, tokenizer_fp, cfg.train.seq_len,
                               Objective(cfg.objective.name).value, lm.cache_root(cfg.data.cache_dir),
                               num_proc=cfg.data.get("num_proc"), say=say,
                               progress=progress and int(os.environ.get("RANK", "0") or 0) == 0)
    packed, st = prepared.packed, prepared.stats
    say(f"blocks: {len(packed.train):,} training x {cfg.train.seq_len} tokens ({packed.train.size:,} tokens), "
        f"{len(packed.validation):,} validation ({st.validation}); {st.documents:,} documents"
        + (f", {len(st.empty_shards)} empty shard(s) skipped" if st.empty_shards else "")
        + (" (from cache)" if packed.cache_hit else f", prepared in {st.seconds:.1f}s at {st.tokens_per_s:,.0f} "
           f"tokens/s with {st.num_proc} process(es)"))
    return prepared


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
