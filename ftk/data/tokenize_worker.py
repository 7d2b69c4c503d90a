"""The tokenizing side of `ftk prepare`: what one process (the main one, or a pool worker) does with a batch of
documents. Kept apart from ftk/data/prepare.py because it is the part that runs in other processes: it is
imported by spawned workers, so it holds no state of the preparation beyond the worker's tokenizer.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np

from ftk.data import stream

WORKER: Dict[str, Any] = {}


def backend_of(tokenizer: Any) -> Any:
    """A copy of the Rust tokenizer with truncation and padding off (a classification run may have switched
    them on in the shared one), or None for a slow tokenizer."""
    import copy

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    return backend


def init_worker(backend_json: str, dtype: str, separator: int) -> None:
    from tokenizers import Tokenizer

    _die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process, one core: the pool is the parallelism
    WORKER.update(backend=Tokenizer.from_str(backend_json), dtype=np.dtype(dtype), separator=separator,
                   tokenizer=None)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the process that started it dies (a killed preparation must not leave
    workers behind holding its output pipes open); elsewhere the pool's own shutdown is all there is."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def encode(texts: List[str], split: bool, seed: int, fraction: float) -> Tuple[np.ndarray, int, np.ndarray, int]:
    """(training ids, training documents, validation ids, validation documents) of one batch, each document's ids
    followed by the separator, documents in order."""
    w = WORKER
    if w["backend"] is not None:
        ids = [e.ids for e in w["backend"].encode_batch(texts, add_special_tokens=False)]
    else:
        ids = w["tokenizer"](texts, add_special_tokens=False, verbose=False)["input_ids"]
    train: List[int] = []
    valid: List[int] = []
    n_valid = 0
    for text, doc in zip(texts, ids):
        if split and stream.held_out(text, seed, fraction):
            valid.extend(doc)
            valid.append(w["separator"])
            n_valid += 1
        else:
            train.extend(doc)
            train.append(w["separator"])
    return (np.asarray(train, dtype=w["dtype"]), len(texts) - n_valid, np.asarray(valid, dtype=w["dtype"]),
            n_valid)
