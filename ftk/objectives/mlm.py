"""Masked LM (BERT): select a share of tokens, corrupt them 80/10/10, predict the originals.

Masking draws from a generator the loop seeds per (step, micro-batch, rank), so a resumed run
masks exactly as the uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ftk.objectives.base import Objective
from ftk.objectives.linear_cross_entropy import summed_token_loss


class MaskedLM(Objective):
    name = "mlm"

    def __init__(self, settings: Any, tokenizer: Any):
        super().__init__(settings, tokenizer)
        if tokenizer.mask_token_id is None:
            from ftk.errors import UsageError

            raise UsageError("the tokenizer has no mask token, so objective=mlm cannot mask; "
                             "use an encoder tokenizer (BERT/RoBERTa) or objective=clm")
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.probability = settings.mlm_probability
        self.mask_share, self.random_share = settings.mask_replace_prob, settings.random_replace_prob

    def inputs(self, block: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        labels = block.clone()
        special = torch.isin(block, self.special_ids.to(block.device))
        draw = torch.rand(block.shape, generator=generator, device=block.device)
        selected = (draw < self.probability) & ~special
        labels[~selected] = -100
        # One more uniform draw splits the selected tokens into [MASK] / random / unchanged.
        how = torch.rand(block.shape, generator=generator, device=block.device)
        to_mask = selected & (how < self.mask_share)
        to_random = selected & (how >= self.mask_share) & (how < self.mask_share + self.random_share)
        corrupted = block.clone()
        corrupted[to_mask] = self.mask_id
        random_ids = torch.randint(self.vocab_size, block.shape, generator=generator, device=block.device)
        corrupted[to_random] = random_ids[to_random]
        return {"input_ids": corrupted, "labels": labels}

    def targets(self, inputs: Dict[str, torch.Tensor]) -> int:
        return int((inputs["labels"] != -100).sum())

    def loss(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        # `labels` is not passed to the model; the head's output is only computed where there is a target.
        return summed_token_loss(model, inputs, inputs["labels"])
