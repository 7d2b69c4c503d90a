"""Scores for generated text from a classifier or a reward model (`score_with=RUN/final`).

A reward model (one output) scores with its raw output; a classifier with the probability of one label
(`score_label`, else the last label in its label order, e.g. SST-2's "1" = positive), and every label's
probability is kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ftk.errors import UsageError


@dataclass
class Scorer:
    model: Any
    tokenizer: Any
    labels: List[str]
    label: Optional[str]      # the label whose probability is the score; None: a reward model's raw output
    device: Any
    max_len: int

    def describe(self) -> str:
        return "reward (raw output)" if self.label is None else f"P({self.label})"

    def score(self, texts: List[str], batch_size: int = 16) -> List[Dict[str, Any]]:
        results: List[Dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            enc = self.tokenizer(chunk, truncation=True, max_length=self.max_len, padding=True, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                logits = self.model(**enc).logits.float().cpu()
            for row in logits:
                if self.label is None:
                    results.append({"score": float(row[0])})
                else:
                    probs = torch.softmax(row, dim=-1).tolist()
                    results.append({"score": probs[self.labels.index(self.label)],
                                    "label_probs": dict(zip(self.labels, probs))})
        return results


def load(path: str, score_label: Optional[str], cfg: Any, device: Any) -> Scorer:
    from ftk.evaluation import loading

    target = loading.resolve_path(path)
    if target.objective not in ("classification", "reward"):
        raise UsageError(f"score_with={path} is not a classifier or reward model (final/ of `ftk finetune` with "
                         "objective=classification or objective=reward); pass one")
    model, tokenizer = loading.classifier(target, cfg)
    config = model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if config.num_labels == 1:
        if score_label:
            raise UsageError(f"score_label={score_label}: {path} is a reward model with one output and no labels; "
                             "drop score_label")
        label = None
    else:
        label = str(score_label) if score_label is not None else labels[-1]
        if label not in labels:
            raise UsageError(f"score_label={score_label} is not a label of {path}; its labels: {', '.join(labels)}")
    from ftk.evaluation.loading import positions

    return Scorer(model.to(device).eval(), tokenizer, labels, label, device, positions(model))
