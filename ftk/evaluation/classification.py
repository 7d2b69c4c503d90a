"""Classification metrics from predictions: accuracy, macro-F1, per-class precision/recall, confusion."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch


def metrics(predicted: Sequence[int], gold: Sequence[int], labels: List[str]) -> Dict[str, Any]:
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]  # rows: gold, columns: predicted
    for p, g in zip(predicted, gold):
        confusion[g][p] += 1
    per_class, f1s = {}, []
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted_i = sum(confusion[r][i] for r in range(k))
        gold_i = sum(confusion[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / gold_i if gold_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": gold_i}
        f1s.append(f1)
    n = len(gold)
    return {"accuracy": sum(confusion[i][i] for i in range(k)) / max(n, 1), "macro_f1": sum(f1s) / max(k, 1),
            "examples": n, "per_class": per_class, "confusion": confusion, "labels": labels}


@torch.no_grad()
def predict(model: Any, source: Any, batch_size: int, device: Any):
    """(predicted, gold) class indices over the source's validation examples, in its batching order."""
    model.eval()
    predicted: List[int] = []
    gold: List[int] = []
    for batch in source.validation_batches(batch_size, 0):
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predicted += logits.argmax(-1).tolist()
        gold += batch["labels"].tolist()
    return predicted, gold
