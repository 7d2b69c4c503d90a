"""Causal LM: predict token t+1 from tokens <= t; every position of a packed block is a target."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ftk.objectives.base import Objective
from ftk.objectives.linear_cross_entropy import summed_token_loss


class CausalLM(Objective):
    name = "clm"

    def inputs(self, block: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        # Packed blocks have no padding, so no attention mask: SDPA then takes its fastest causal path.
        return {"input_ids": block}

    def targets(self, inputs: Dict[str, torch.Tensor]) -> int:
        """How many positions carry a loss (known before the forward pass)."""
        if "attention_mask" in inputs:
            return int(inputs["attention_mask"][:, 1:].sum())
        ids = inputs["input_ids"]
        return ids.shape[0] * (ids.shape[1] - 1)

    def loss(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = inputs["input_ids"]
        # Position t predicts token t+1; the last position has no target.
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)
        if "attention_mask" in inputs:  # padded batches (fine-tuning): no loss on padding
            targets = targets.masked_fill(F.pad(inputs["attention_mask"][:, 1:], (0, 1), value=0) == 0, -100)
        return summed_token_loss(model, inputs, targets)
