"""Head, then full: train the new head on the frozen body for `head_steps`, then every weight at
`full_lr_ratio` of the rate, so a random head does not send large gradients into the body (LP-FT)."""

from ftk.regimes import Context, Prepared
from ftk.regimes.structure import set_trainable


class HeadThenFull:
    def __init__(self, head, head_steps: int):
        self.head, self.head_steps, self.phase = list(head), head_steps, None

    def on_step_start(self, step, model, optimizer) -> None:
        phase = "head" if step < self.head_steps else "full"
        if phase != self.phase:
            if phase == "head":
                set_trainable(model, self.head)
            else:
                for p in model.parameters():
                    p.requires_grad_(True)
            self.phase = phase


def apply(model, ctx: Context) -> Prepared:
    s = ctx.settings
    switch = HeadThenFull(ctx.new_head, s.head_steps)
    switch.on_step_start(0, model, None)
    return Prepared(model, callbacks=[switch],
                    lr_multiplier=lambda step: 1.0 if step < s.head_steps else s.full_lr_ratio,
                    note=f"head alone for {s.head_steps} steps, then everything at {s.full_lr_ratio:g}x the rate")
