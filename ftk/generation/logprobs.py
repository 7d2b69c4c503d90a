"""Log-probabilities of generated completions under a model, for the KL of a tuned policy from a reference.

KL(policy || reference) per sequence is E_{y ~ policy}[log policy(y|x) - log reference(y|x)]: with samples
drawn from the policy itself (temperature 1, no top-k / top-p truncation) the mean difference of the two
log-probabilities over the samples is an unbiased estimate. Both are read by teacher forcing on prompt +
completion (+ its end-of-text token when the model ended it), the same way for both models.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import torch

from ftk.generation.sampling import Sample


def completion_logprobs(model: Any, samples: Sequence[Sample], pad_id: int, eos_id: Any, device: Any,
                        batch_size: int = 8) -> List[float]:
    from ftk.objectives.preference import sequence_logps

    out: List[float] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rows = [(s.prompt_ids, s.completion_ids + ([eos_id] if s.stopped == "eos" and eos_id is not None else []))
                for s in chunk]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (prompt, completion) in enumerate(rows):
            n = len(prompt) + len(completion)
            ids[i, :n] = torch.tensor(prompt + completion, dtype=torch.long)
            labels[i, len(prompt):n] = torch.tensor(completion, dtype=torch.long)
            mask[i, :n] = 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        with torch.no_grad():
            sums, _ = sequence_logps(model, inputs)
        out.extend(sums.double().cpu().tolist())
    return out


def exact_sampling(sampling: Any) -> bool:
    """Whether samples come from the model's own distribution (the KL estimate's condition)."""
    return bool(sampling.do_sample) and sampling.temperature == 1 and sampling.top_p == 1 and sampling.top_k == 0 \
        and sampling.repetition_penalty == 1
