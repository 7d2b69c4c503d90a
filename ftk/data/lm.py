"""Language-model data: documents -> tokens joined by a separator -> fixed-length blocks.

`pack` does it in memory for small text (evaluation, forgetting probes); pretraining corpora go through
`ftk.data.prepare`, which cuts blocks the same way while streaming, and caches them as memory-mapped .npy files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from ftk.errors import UsageError, first_line
from ftk.paths import cache_root  # noqa: F401  (callers use lm.cache_root)


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
