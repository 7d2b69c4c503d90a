"""Supervised fine-tuning (instruction tuning): causal LM loss on the response tokens only.

Batches come from `ftk.data.examples.collate`: input_ids, attention_mask, and labels that are -100
on the prompt and on padding (see `ftk.data.instructions`). Position t predicts labels[t + 1].
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

import torch.nn.functional as F

from ftk.objectives.base import Objective
from ftk.objectives.linear_cross_entropy import summed_token_loss


class SupervisedFineTuning(Objective):
    name = "sft"

    def inputs(self, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None
               ) -> Dict[str, torch.Tensor]:
        # Already padded (dynamic padding); nothing is drawn at random.
        return batch

    def targets(self, inputs: Dict[str, torch.Tensor]) -> int:
        """How many positions carry a loss (known before the forward pass)."""
        return int((self._targets(inputs) != -100).sum())

    @staticmethod
    def _targets(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        targets = inputs["labels"][:, 1:]
        if "attention_mask" in inputs:  # collate already puts -100 on padding; never train on it anyway
            targets = targets.masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
        return targets

    def loss(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        # `labels` is not passed to the model: it would compute a (mean) loss of its own. Only the labelled
        # positions reach the head: prompts are often most of the tokens.
        return summed_token_loss(model, inputs, F.pad(self._targets(inputs), (0, 1), value=-100))
