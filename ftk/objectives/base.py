"""The contract between an objective and the training loop (ftk/train.py), in one place.

An objective turns a batch from its data source into model inputs (drawing any randomness, e.g. MLM
masking, from the generator the loop seeds per step, micro-batch and rank, so a resumed run draws the
same), says how many targets a batch carries before the forward pass (to weight micro-batches and
ranks exactly), and returns its loss as (sum, count). Validation accumulates `eval_sums`. Whether
validation reports perplexity comes from the objective's row (ftk/objectives/table.py).

An objective may also report figures of its own (preference objectives: rewards, accuracy, margin): it names
them in `metric_names` and returns their sums over the batch's targets from `loss_with_metrics`; the loop
divides each by the global target count, as it does the loss, so they are exact means over micro-batches and
ranks, logged beside the loss at every logging step and as `eval_<name>` after validation. By default there
are none.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch


class Objective:
    name: str = ""  # its row in ftk/objectives/table.py
    # Figures logged beside the loss (sums over targets from loss_with_metrics), known before any batch so every
    # rank reduces the same ones in the same order.
    metric_names: Tuple[str, ...] = ()

    def __init__(self, settings: Any = None, tokenizer: Any = None):
        self.settings = settings

    @property
    def language_model(self) -> bool:
        from ftk.objectives.table import facts

        return facts(self.name).language_model

    def inputs(self, batch: Any, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Model inputs (and targets) from one batch of the data source."""
        raise NotImplementedError

    def targets(self, inputs: Dict[str, torch.Tensor]) -> int:
        """How many targets carry a loss in `inputs`, known before the forward pass."""
        raise NotImplementedError

    def loss(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of targets), so the loop weights every target equally."""
        raise NotImplementedError

    def loss_with_metrics(self, model: Any, inputs: Dict[str, torch.Tensor]
                          ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """(summed loss, number of targets, {name: sum over targets} for each of `metric_names`, detached)."""
        loss_sum, count = self.loss(model, inputs)
        return loss_sum, count, {}

    def eval_sums(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What validation sums over batches and ranks: loss_sum, count and correct (0 without a task
        head), and the sums of `metric_names`, all on the device of the loss."""
        loss_sum, count, metrics = self.loss_with_metrics(model, inputs)
        return {"loss_sum": loss_sum, "count": count.to(loss_sum.device, torch.float64),
                "correct": torch.zeros((), dtype=torch.float64, device=loss_sum.device), **metrics}
