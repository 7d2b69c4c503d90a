"""Language-model figures that do not depend on batch size.

Causal LM: a window of `context` tokens slides by `stride`; each window scores only the tokens no
earlier window scored, so every token counts once, with at least context - stride tokens of history
(the first window's tokens with less; with stride = context, windows share one token: see `windows`). Full windows are batched (same length, so no padding); the
loss is summed in float64 and divided by the token count at the end: the figure is the same at any
batch size, up to float rounding (1e-6 relative here).

Masked LM: 15% of tokens masked 80/10/10 with a generator seeded per block, loss and accuracy on
them; optionally pseudo-perplexity, masking every token in turn (Salazar et al. 2020).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def windows(n_tokens: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first scored position) of each window, starting every `stride` tokens. Position p is
    scored in the first window that reaches it, from the logits at p - 1 (position 0 has no history).

    A window never starts past the last position already scored: with stride = context (non-overlapping windows)
    consecutive windows share one token, the history of the next window's first scored token, so that every
    token is still scored once (lm-evaluation-harness's rolling windows overlap by one token the same way);
    otherwise the first token of every window after the first would go unscored, and those are the hardest."""
    out, scored_until, begin = [], 1, 0
    while begin < n_tokens:
        end = min(begin + context, n_tokens)
        first = max(scored_until, begin + 1)
        if end > first:
            out.append((begin, end, first))
        scored_until = max(scored_until, end)
        if end == n_tokens:
            break
        begin = min(begin + stride, scored_until - 1)
    return out


@torch.no_grad()
def causal_perplexity(model: Any, ids: np.ndarray, context: int, stride: int, batch_size: int,
                      device: Any) -> Dict[str, float]:
    model.eval()
    tokens = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    spans = windows(len(tokens), context, stride)
    total, count = 0.0, 0
    groups: Dict[int, List[Tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    for length, same in groups.items():
        for start in range(0, len(same), batch_size):
            chunk = same[start:start + batch_size]
            batch = torch.stack([tokens[b:e] for b, e, _ in chunk]).to(device)
            logits = model(input_ids=batch).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # (B, L-1)
            for row, (b, e, first) in enumerate(chunk):
                # position p (absolute) is predicted by logits at p-1-b within the window
                part = nll[row, first - b - 1:]
                total += float(part.double().sum())
                count += part.numel()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "windows": len(spans),
            "context": context, "stride": stride}


def bits_per_byte(causal: Dict[str, float], text_bytes: int) -> float:
    """The causal loss (nats per scored token) over the whole text, in bits per UTF-8 byte of it: comparable
    between tokenizers, which perplexity is not."""
    return causal["loss"] * causal["tokens"] / math.log(2) / max(text_bytes, 1)


@torch.no_grad()
def masked_lm(model: Any, blocks: np.ndarray, tokenizer: Any, batch_size: int, seed: int, device: Any,
              pseudo: bool = False) -> Dict[str, float]:
    from ftk.objectives.mlm import MaskedLM
    from ftk.objectives.table import MlmSettings

    model.eval()
    masking = MaskedLM(MlmSettings(), tokenizer)
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(blocks), batch_size):
        rows = []
        for i in range(start, min(start + batch_size, len(blocks))):
            block = torch.from_numpy(np.asarray(blocks[i], dtype=np.int64))[None]
            rows.append(masking.inputs(block, torch.Generator().manual_seed(seed * 1_000_003 + i)))
        ids = torch.cat([r["input_ids"] for r in rows]).to(device)
        labels = torch.cat([r["labels"] for r in rows]).to(device)
        logits = model(input_ids=ids).logits.float()
        picked = labels != -100
        total += float(F.cross_entropy(logits[picked], labels[picked], reduction="sum").double())
        correct += int((logits[picked].argmax(-1) == labels[picked]).sum())
        count += int(picked.sum())
    loss = total / max(count, 1)
    out = {"masked_loss": loss, "masked_accuracy": correct / max(count, 1), "masked_tokens": count,
           "masked_perplexity": math.exp(min(loss, 50.0))}
    if pseudo:
        out.update(pseudo_perplexity(model, blocks, tokenizer, batch_size, device))
    return out


@torch.no_grad()
def pseudo_perplexity(model: Any, blocks: np.ndarray, tokenizer: Any, batch_size: int, device: Any) -> Dict[str, float]:
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    total, count = 0.0, 0
    for block in blocks:
        ids = torch.from_numpy(np.asarray(block, dtype=np.int64))
        positions = [p for p in range(len(ids)) if not bool(torch.isin(ids[p], special))]
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            batch = ids.repeat(len(chunk), 1)
            batch[torch.arange(len(chunk)), chunk] = tokenizer.mask_token_id
            logits = model(input_ids=batch.to(device)).logits.float()
            logp = torch.log_softmax(logits[torch.arange(len(chunk)), chunk], -1)
            total -= float(logp[torch.arange(len(chunk)), ids[chunk].to(device)].double().sum())
            count += len(chunk)
    loss = total / max(count, 1)
    return {"pseudo_perplexity": math.exp(min(loss, 50.0)), "pseudo_tokens": count}
