"""Labelled examples (classification, SFT) as a source the training loop can address by index.

Examples are tokenized once into lists of ids; a batch pads only to its own longest example
(dynamic padding), and training batches are drawn from examples of similar length (length grouping, on by
default), so little compute goes to padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class Example:
    input_ids: List[int]
    label: Optional[int] = None               # classification: the class index
    token_labels: Optional[List[int]] = None  # SFT: per-token targets, -100 where no loss (the prompt)


def collate(examples: Sequence[Example], pad_id: int, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad to the longest example of the batch; attention_mask marks real tokens."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    token_labels = None
    if examples[0].token_labels is not None:
        token_labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        ids[row, cols] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, cols] = 1
        if token_labels is not None:
            token_labels[row, cols] = torch.tensor(e.token_labels, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_labels is not None:
        batch["labels"] = token_labels
    elif examples[0].label is not None:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


class ExampleSource:
    """Training and validation examples served as padded batches (see ftk.train.Source).

    `stream(seed, batch_size)` is the order the loop reads training examples in: with `group_by_length` (the
    default) a LengthGroupedStream whose groups are the loop's global batches (so every micro-batch, a slice of
    one group, holds examples of similar length, and the order does not depend on the number of processes);
    otherwise (or with one example per batch, where there is no padding to save, or fewer than 50 batches of
    examples) the uniform BlockStream.
    """

    def __init__(self, train: List[Example], validation: List[Example], pad_id: int, padding_side: str = "right",
                 group_by_length: bool = True, pack_to: Optional[int] = None):
        self.train, self.validation, self.pad_id, self.padding_side = train, validation, pad_id, padding_side
        self.n_train = len(train)
        self.group_by_length = group_by_length
        # Packing (ftk.data.packing): each batch's examples share rows of up to `pack_to` tokens; there is no
        # padding to save by grouping lengths, so the stream is the uniform one.
        self.pack_to = pack_to

    def _collate(self, examples: Sequence[Example]) -> Dict[str, torch.Tensor]:
        if self.pack_to:
            from ftk.data.packing import collate_packed

            return collate_packed(examples, self.pad_id, self.pack_to)
        return collate(examples, self.pad_id, self.padding_side)

    def stream(self, seed: int, batch_size: int) -> Any:
        from ftk.data.sampler import BlockStream, LengthGroupedStream

        # Grouping needs an epoch of at least one mega-chunk (50 batches): on fewer examples the sort spans
        # the whole epoch, every batch is drawn from a narrow length band each epoch, and small tasks trained
        # measurably worse (tests/test_finetune.py: 96 examples, LoRA 0.67 and BERT 0.77 accuracy against 0.70
        # and 0.80 with random batches). Such runs are short; their padding is not worth the risk.
        if self.pack_to or not self.group_by_length or batch_size <= 1 or self.n_train < LengthGroupedStream.MEGA * batch_size:
            return BlockStream(self.n_train, seed)
        return LengthGroupedStream([len(e.input_ids) for e in self.train], seed, batch_size)

    def train_batch(self, indices: np.ndarray) -> Dict[str, torch.Tensor]:
        return self._collate([self.train[i] for i in indices])

    def validation_batches(self, batch_size: int, limit: int) -> Iterable[Dict[str, torch.Tensor]]:
        # Sorted by length so that validation batches carry little padding; the order does not change sums.
        order = sorted(range(len(self.validation)), key=lambda i: len(self.validation[i].input_ids))
        n = len(order) if not limit else min(len(order), limit * batch_size)
        for start in range(0, n, batch_size):
            yield self._collate([self.validation[i] for i in order[start:start + batch_size]])

    def tokens_in(self, batch: Dict[str, torch.Tensor]) -> int:
        return int(batch["real_tokens"]) if "real_tokens" in batch else int(batch["attention_mask"].sum())

    def longest(self) -> int:
        return max(len(e.input_ids) for e in (*self.train, *self.validation))
