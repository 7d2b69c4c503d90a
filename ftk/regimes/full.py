"""Full fine-tuning: every weight trains (at the regime's low default rate)."""

from ftk.regimes import Context, Prepared


def apply(model, ctx: Context) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model, note="every weight trains")
