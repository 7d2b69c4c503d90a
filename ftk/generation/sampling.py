"""Batched sampling with transformers' `generate`: left padding, the KV cache, seeded per batch.

Prompts are grouped into batches of similar length (less padding) in a fixed order, so the samples depend
only on the prompts, the settings and the batch size, never on timing or the device count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from ftk.errors import UsageError


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_ids: List[int]
    completion_ids: List[int]
    stopped: str              # "eos" (the model ended it) or "length" (max_new_tokens reached)


def generation_kwargs(sampling: Any, tokenizer: Any) -> Dict[str, Any]:
    """transformers' generate() arguments for the sampling settings (greedy when do_sample is false)."""
    kwargs: Dict[str, Any] = {"max_new_tokens": int(sampling.max_new_tokens),
                              "do_sample": bool(sampling.do_sample) and sampling.temperature > 0,
                              "num_return_sequences": int(sampling.samples_per_prompt),
                              "repetition_penalty": float(sampling.repetition_penalty),
                              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                              "use_cache": True}
    if sampling.do_sample and sampling.temperature > 0:
        kwargs.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                      top_k=int(sampling.top_k) or None)
    elif sampling.samples_per_prompt > 1:
        how = "sampling.do_sample=false" if not sampling.do_sample else "sampling.temperature=0"
        raise UsageError(f"sampling.samples_per_prompt={sampling.samples_per_prompt} with {how} gives the same "
                         "greedy text every time; sample (sampling.do_sample=true, temperature > 0) or set "
                         "samples_per_prompt=1")
    else:  # greedy: no sampling knobs (generate() warns when they are set away from their defaults)
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def batches(prompt_ids: Sequence[List[int]], batch_size: int) -> Iterator[List[int]]:
    """Prompt indices in batches of similar length, longest first (a memory problem shows at once)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def left_padded(rows: Sequence[List[int]], pad_id: int, device: Any) -> Dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def generate(model: Any, tokenizer: Any, prompt_ids: Sequence[List[int]], sampling: Any, batch_size: int,
             device: Any, advance: Callable[[int], None] = lambda n: None) -> List[Sample]:
    """Every prompt's samples, in prompt order then sample order."""
    kwargs = generation_kwargs(sampling, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    n = int(sampling.samples_per_prompt)
    out: List[Optional[Sample]] = [None] * (len(prompt_ids) * n)
    for number, indices in enumerate(batches(prompt_ids, batch_size)):
        torch.manual_seed(int(sampling.seed) * 1_000_003 + number)  # the batch's draws, whatever ran before
        inputs = left_padded([prompt_ids[i] for i in indices], pad, device)
        with torch.no_grad():
            generated = model.generate(**inputs, **kwargs)
        new = generated[:, inputs["input_ids"].shape[1]:].tolist()  # [prompt0 s0, prompt0 s1, ..., prompt1 s0...]
        for row, tokens in enumerate(new):
            prompt_index, sample_index = indices[row // n], row % n
            stopped = "length"
            if eos is not None and eos in tokens:
                tokens, stopped = tokens[:tokens.index(eos)], "eos"
            while tokens and tokens[-1] == pad and pad != eos:
                tokens.pop()
            out[prompt_index * n + sample_index] = Sample(prompt_index, sample_index, list(prompt_ids[prompt_index]),
                                                          tokens, stopped)
        advance(len(indices))
    return [s for s in out if s is not None]
