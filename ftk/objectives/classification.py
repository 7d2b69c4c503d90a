"""Sequence classification: cross-entropy of the task head's logits against the class index.

Decoders (GPT-2, Llama) classify from the last real token, encoders (BERT) from [CLS]; both are
transformers' own *ForSequenceClassification heads, freshly initialised on the pretrained body.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ftk.objectives.base import Objective


class Classification(Objective):
    name = "classification"

    def inputs(self, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None):
        return batch

    def targets(self, inputs: Dict[str, torch.Tensor]) -> int:
        return int(inputs["labels"].shape[0])

    def logits(self, model: Any, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits

    def loss(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(model, inputs)
        labels = inputs["labels"]
        # The count lives with the loss (on the GPU under CUDA): the loop stacks and reduces them together.
        return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel(),
                                                                                       device=labels.device)

    def eval_sums(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sums the validation pass accumulates over batches and processes."""
        logits = self.logits(model, inputs).float()
        labels = inputs["labels"]
        return {"loss_sum": F.cross_entropy(logits, labels, reduction="sum"),
                "count": torch.tensor(float(labels.numel()), device=labels.device),
                "correct": (logits.argmax(-1) == labels).sum().float()}
