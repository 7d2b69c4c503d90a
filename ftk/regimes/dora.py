"""DoRA (peft): LoRA whose update is split into a direction (the low-rank update) and a learned
per-output magnitude (Liu et al. 2024), closer to full fine-tuning at LoRA's cost plus one vector per
adapted layer. It saves a LoRA-type adapter (use_dora=true) that merges exactly like LoRA."""

from ftk.regimes import Context, Prepared
from ftk.regimes.lora import wrap


def apply(model, ctx: Context) -> Prepared:
    return wrap(model, ctx, method="DoRA", use_dora=True)
