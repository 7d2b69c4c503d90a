"""Packing for fine-tuning: the examples of a micro-batch share rows of up to `train.seq_len` tokens, with
attention kept inside each example.

A padded batch pays for every padding token in every layer; even length-grouped, SFT and classification
batches keep 11-13% padding. Packed, a micro-batch's examples are laid into as few rows as hold them (longest
first, each into the least-filled row, so the rows come out nearly equal and little is left to pad), and the
position ids restart at 0 at each example. transformers 5 reads restarting position ids without an
attention mask as packed sequences (masking_utils.find_packed_sequence_indices): the mask it builds is
block-diagonal causal, and flash-attention-2 runs varlen kernels on the same input; on a CPU in bf16
ftk.cpu_attention computes each example's attention on its own. The padding at a row's end is one more
"example" of its own with no target.

What a step trains on is unchanged: the same examples per step (train.batch_size counts examples), the same
targets (the first token of each example is never a target, as it is not unpacked), so losses, per-example
metrics, exact resume and equal losses across process counts are those of the padded batch to float
rounding; only the shape of the tensors changes.

Whether a run packs is decided here, once, from the objective's row (ObjectiveFacts.packs) and the regime
(prompt tuning prepends virtual tokens to each row, which would sit in front of the first example only).
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, List, Optional, Sequence

import torch

from ftk.errors import UsageError


def packing_on(setting: Optional[bool], objective: str, regime: str) -> bool:
    """data.packing resolved: null packs where it applies; true where it cannot is a usage error."""
    from ftk.objectives.table import facts as objective_facts
    from ftk.regimes.table import facts as regime_facts

    row = objective_facts(objective)
    virtual = bool(regime_facts(regime).virtual_tokens)
    applies = row.packs and not virtual
    if setting and not applies:
        why = (f"regime={regime} prepends virtual tokens to each row" if virtual else
               f"objective={objective} does not train on packed sequences (packing applies to: "
               + ", ".join(_packing_objectives()) + ")")
        raise UsageError(f"data.packing=true: {why}; drop data.packing=true (or set data.packing=false)")
    return applies if setting is None else bool(setting)


def _packing_objectives() -> List[str]:
    from ftk.objectives.table import ROWS

    return [row.name for row in ROWS if row.packs]


def pack_rows(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Indices of `lengths` grouped into the fewest rows of at most `capacity` tokens this finds: longest
    first, each into the least-filled row (rows come out nearly equal, so padding them to the longest costs
    little); one more row whenever an example does not fit. Each row lists its indices in ascending order."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens exceeds the row capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows = max(1, -(-sum(lengths) // capacity))
    while True:
        heap = [(0, r) for r in range(rows)]
        members: List[List[int]] = [[] for _ in range(rows)]
        for i in order:
            load, r = heapq.heappop(heap)
            if load + lengths[i] > capacity:
                break
            members[r].append(i)
            heapq.heappush(heap, (load + lengths[i], r))
        else:
            return [sorted(m) for m in members if m]
        rows += 1


def collate_packed(examples: Sequence[Any], pad_id: int, capacity: int) -> Dict[str, torch.Tensor]:
    """The examples packed into rows (see pack_rows): input_ids and position_ids (restarting per example and
    for the padding at a row's end), labels (-100 on each example's first token, on prompts and on padding)
    and real_tokens, the number of tokens that are not padding. No attention_mask: its absence with
    restarting position ids is what tells transformers the rows are packed."""
    lengths = [len(e.input_ids) for e in examples]
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e, n = examples[i], lengths[i]
            ids[r, at:at + n] = torch.tensor(e.input_ids, dtype=torch.long)
            positions[r, at:at + n] = torch.arange(n)
            if e.token_labels is not None:
                labels[r, at + 1:at + n] = torch.tensor(e.token_labels[1:], dtype=torch.long)
            at += n
        positions[r, at:] = torch.arange(width - at)
        # The padding is a segment of its own with no target, so its token ids change nothing; the row's last
        # real token rather than pad_id keeps transformers from warning of padding without an attention mask.
        ids[r, at:] = ids[r, at - 1]
    return {"input_ids": ids, "position_ids": positions, "labels": labels,
            "real_tokens": torch.tensor(sum(lengths), dtype=torch.long)}
