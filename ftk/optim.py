"""Optimizer and learning-rate schedule from the train config and the hardware plan."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional

import torch

from ftk.errors import UsageError
from ftk.schemas import Schedule


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Decay matrices, not biases or norm weights (1-D tensors), as GPT-2/BERT training does.

    Frozen parameters are included too: regimes that unfreeze layers during training (gradual
    unfreezing, head-then-full) need them in the optimizer, and AdamW skips any without a gradient.
    """
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, train: Any, kind: str, device: str) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay)
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    if kind == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("hardware.optimizer=adamw_8bit needs bitsandbytes: pip install 'ftk[quant]'") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    fused = kind == "adamw_fused"
    return torch.optim.AdamW(groups, fused=fused or None, foreach=None if fused else True, **kwargs)


def lr_factor(step: int, train: Any) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then the configured decay."""
    warmup, total, floor = train.warmup_steps, train.max_steps, train.min_lr_ratio
    if warmup and step < warmup:
        return (step + 1) / warmup
    schedule = Schedule(train.schedule)
    if schedule is Schedule.constant:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule is Schedule.linear:
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: Any,
                    multiplier: Optional[Callable[[int], float]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule, times a regime's multiplier by step (e.g. head_then_full's lower rate after the head phase)."""
    if multiplier is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train) * multiplier(step))
