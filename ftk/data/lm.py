"""Language-model data: documents -> tokens joined by a separator -> fixed-length blocks, cached.

The packed blocks of a (source, tokenizer, seq_len, layout, split) are stored once as a .npy file
under the cache directory and memory-mapped on later runs, so a second run starts training without
re-reading or re-tokenizing anything. The key includes the tokenizer's fingerprint: a different
tokenizer never reuses another's tokens.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from ftk.data import sources
from ftk.errors import UsageError, first_line
from ftk.paths import cache_root  # noqa: F401  (callers use lm.cache_root)

CACHE_VERSION = 1
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 20




@dataclass
class TextSplits:
    """Training and validation documents, and a fingerprint of where they came from."""

    train: List[str]
    validation: Optional[List[str]]  # None: hold out the tail of the training token stream
    fingerprint: str
    description: str


def load_splits(data: Any, seed: int) -> TextSplits:
    """Read the configured corpus; hold out validation documents unless a validation set is given."""
    from ftk.data.corpus import embedded_corpus_path

    path = data.path
    description = path
    if path is None:
        path = str(embedded_corpus_path(cache_root(data.cache_dir)))
        description = "embedded corpus (Python standard-library docstrings)"
    validation_files = sources.list_files(data.validation_path) if data.validation_path and sources.is_local(
        data.validation_path) else []
    train = _texts(data, path, data.split, exclude=validation_files)
    if data.max_documents:
        train = train[: data.max_documents]
    validation: Optional[List[str]] = None
    if data.validation_path:
        validation = _texts(data, data.validation_path, data.validation_split or data.split)
    elif data.validation_split and not sources.is_local(path):
        validation = _texts(data, path, data.validation_split)
    elif len(train) >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
        order = np.random.default_rng(seed).permutation(len(train))
        n_valid = max(1, int(round(len(train) * data.validation_fraction)))
        held = set(order[:n_valid].tolist())
        validation = [t for i, t in enumerate(train) if i in held]
        train = [t for i, t in enumerate(train) if i not in held]
    h = hashlib.sha256()
    for text in (train, validation or []):
        for doc in text:
            h.update(hashlib.sha256(doc.encode("utf-8", "replace")).digest())
        h.update(b"|split|")
    return TextSplits(train, validation, h.hexdigest(), description)


def _texts(data: Any, path: str, split: str, exclude=()) -> List[str]:
    ds = sources.load_records(path, hub_config=data.hub_config, split=split, exclude=exclude)
    return sources.text_column(ds, data.text_column, path)


@dataclass
class Layout:
    """How a token stream becomes blocks: decoders join documents with EOS; encoders wrap each
    block in [CLS] ... [SEP] and separate documents with [SEP] (RoBERTa's full-sentence packing)."""

    separator: int
    prefix: Optional[int] = None
    suffix: Optional[int] = None

    @classmethod
    def for_objective(cls, objective: str, tokenizer: Any) -> "Layout":
        if objective == "mlm":
            cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
            if cls_id is None or sep_id is None:
                raise UsageError("objective=mlm needs a tokenizer with [CLS]/[SEP] (or <s>/</s>) tokens")
            return cls(separator=sep_id, prefix=cls_id, suffix=sep_id)
        if tokenizer.eos_token_id is None:
            raise UsageError("objective=clm needs a tokenizer with an end-of-text token to join documents")
        return cls(separator=tokenizer.eos_token_id)

    def key(self) -> str:
        return f"{self.separator},{self.prefix},{self.suffix}"


def pack(texts: List[str], tokenizer: Any, seq_len: int, layout: Layout) -> np.ndarray:
    """Tokenize documents, join them with the separator and cut the stream into (n, seq_len) blocks."""
    content = seq_len - (layout.prefix is not None) - (layout.suffix is not None)
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.int32
    pieces: List[np.ndarray] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # A transformers call with truncation=True (e.g. tokenizing classification examples) leaves truncation
        # switched on in the shared Rust tokenizer; a copy with it off packs whole documents, whatever came before.
        backend = copy.deepcopy(backend)
        backend.no_truncation()
        backend.no_padding()
    for start in range(0, len(texts), 1000):
        batch = texts[start:start + 1000]
        if backend is not None:  # the Rust tokenizer encodes a batch in parallel, without length warnings
            ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc in ids:
            pieces.append(np.asarray(doc + [layout.separator], dtype=dtype))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    n = len(stream) // content
    blocks = stream[: n * content].reshape(n, content)
    columns = []
    if layout.prefix is not None:
        columns.append(np.full((n, 1), layout.prefix, dtype=dtype))
    columns.append(blocks)
    if layout.suffix is not None:
        columns.append(np.full((n, 1), layout.suffix, dtype=dtype))
    return np.concatenate(columns, axis=1) if len(columns) > 1 else blocks


@dataclass
class PackedData:
    train: np.ndarray       # (n_train, seq_len) token ids, memory-mapped from the cache
    validation: np.ndarray  # (n_valid, seq_len)
    cache_hit: bool


def _cached_blocks(path: Path, seq_len: int) -> np.ndarray:
    """A cache entry memory-mapped, after the checks that catch a damaged one: a readable .npy header, 2-D
    integer blocks of seq_len tokens, and a file as long as the header says (truncation). Raises ValueError."""
    try:
        blocks = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # truncated data: "mmap length is greater than file size"
        raise ValueError(first_line(exc)) from None
    if blocks.ndim != 2 or blocks.shape[1] != seq_len or blocks.dtype.kind not in "iu":
        raise ValueError(f"holds {blocks.dtype} blocks of shape {blocks.shape}, not blocks of {seq_len} token ids")
    expected = blocks.offset + blocks.size * blocks.itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"{path.stat().st_size:,} bytes where its header promises {expected:,}")
    return blocks


def packed_blocks(splits: TextSplits, tokenizer: Any, seq_len: int, objective: str, cache_dir: Optional[str],
                  tokenizer_fingerprint: str, say: Any = None) -> PackedData:
    """Blocks for training and validation, from the cache when this exact data was packed before.
    A damaged cache entry (truncated, or not this shape) is said and rebuilt."""
    layout = Layout.for_objective(objective, tokenizer)
    key = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "data": splits.fingerprint, "tokenizer": tokenizer_fingerprint,
        "seq_len": seq_len, "layout": layout.key(),
    }, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_root(cache_dir) / "tokens" / key
    train_file, valid_file = folder / "train.npy", folder / "validation.npy"
    if train_file.exists() and valid_file.exists():
        try:
            return PackedData(_cached_blocks(train_file, seq_len), _cached_blocks(valid_file, seq_len), True)
        except ValueError as exc:
            if say is not None:
                say(f"token cache: {folder} is damaged ({exc}); rebuilding it")
    train = pack(splits.train, tokenizer, seq_len, layout)
    if splits.validation is not None:
        validation = pack(splits.validation, tokenizer, seq_len, layout)
    else:  # too few documents to hold some out: hold out the tail of the token stream instead
        n_valid = max(1, len(train) // 20)
        if len(train) < 2:
            validation = train[:0]
        else:
            train, validation = train[:-n_valid], train[-n_valid:]
    if len(train) == 0:
        raise UsageError(f"the training data holds fewer than {seq_len} tokens, too few for one block of "
                         f"train.seq_len={seq_len}; add text or lower train.seq_len")
    if len(validation) == 0:
        raise UsageError(f"the validation data holds fewer than {seq_len} tokens; give a larger "
                         "data.validation_path or lower train.seq_len")
    folder.mkdir(parents=True, exist_ok=True)
    for array, target in ((train, train_file), (validation, valid_file)):
        _save_atomic(array, target)
    return PackedData(np.load(train_file, mmap_mode="r"), np.load(valid_file, mmap_mode="r"), False)


def _save_atomic(array: np.ndarray, target: Path) -> None:
    """Write then rename, so a killed run never leaves a truncated cache entry behind."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp.npy")
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))
    os.replace(tmp, target)
