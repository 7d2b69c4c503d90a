"""In-context learning with no gradient step: k labelled examples in a prompt, the answer chosen by the
log-likelihood the model gives each label's verbalizer after the test text.

For every k the test examples are the same; the shots of test example i are the first k of one
seeded permutation of the training pool, so the 1-shot prompt's example is also the 8-shot prompt's
first. Prompts longer than the model's context drop their oldest shots (reported as shots used).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch


def render(template: str, text: str, label: str = "") -> str:
    return template.replace("{text}", text).replace("{label}", label)


def prompt_parts(template: str) -> Tuple[str, str]:
    """The template split at {label}: what comes before the answer, and after it."""
    if "{label}" not in template or "{text}" not in template:
        from ftk.errors import UsageError

        raise UsageError("eval.template must contain {text} and {label}, e.g. '{text}\\nAnswer: {label}'")
    head, tail = template.split("{label}", 1)
    return head, tail


@torch.no_grad()
def score_candidates(model: Any, prefix: List[int], candidates: List[List[int]], device: Any) -> List[float]:
    """Sum of log-probabilities of each candidate continuation after the prefix (one padded batch)."""
    longest = max(len(prefix) + len(c) for c in candidates)
    ids = torch.zeros((len(candidates), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, c in enumerate(candidates):
        seq = prefix + c
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits, -1)
    scores = []
    for row, c in enumerate(candidates):
        positions = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(c))
        scores.append(float(logp[row, positions, torch.tensor(c)].sum()))
    return scores


def evaluate(model: Any, tokenizer: Any, pool: Sequence[Tuple[str, str]], test: Sequence[Tuple[str, str]],
             labels: List[str], verbalizers: List[str], shots: List[int], template: str, num_test: int, seed: int,
             context: int, device: Any) -> List[Dict[str, Any]]:
    head, _ = prompt_parts(template)
    rng = np.random.default_rng(seed)
    test = [test[i] for i in sorted(rng.permutation(len(test))[:num_test])]
    label_index = {name: i for i, name in enumerate(labels)}
    words = [tokenizer(" " + v if not head.endswith((" ", "\n")) else v, add_special_tokens=False)["input_ids"]
             for v in verbalizers]
    longest_word = max(len(w) for w in words)
    model.eval()
    rows = []
    for k in shots:
        correct, used = 0, 0
        for i, (text, gold) in enumerate(test):
            order = np.random.default_rng([seed, i]).permutation(len(pool))[:k]
            demos = [render(template, pool[j][0], verbalizers[label_index[pool[j][1]]]) for j in order]
            query = render(head, text)
            while True:  # drop the oldest shots until the prompt and the longest answer fit
                prompt = "\n\n".join([*demos, query])
                prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if len(prefix) + longest_word <= context or not demos:
                    break
                demos = demos[1:]
            prefix = prefix[-(context - longest_word):]
            used += len(demos)
            scores = score_candidates(model, prefix, words, device)
            correct += int(int(np.argmax(scores)) == label_index[gold])
        rows.append({"shots": k, "accuracy": correct / max(len(test), 1), "test_examples": len(test),
                     "mean_shots_used": used / max(len(test), 1)})
    return rows
