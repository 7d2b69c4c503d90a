"""Gradual unfreezing (ULMFiT): the head first, then one more block from the top every
`unfreeze_every` steps, the embeddings last, until every weight trains.

What trains at step s is a function of s alone, so a resumed run unfreezes on the same steps.
"""

from typing import List

from ftk.regimes import Context, Prepared
from ftk.regimes.structure import parts, set_trainable


class Unfreeze:
    def __init__(self, stages: List[List[str]], every: int):
        self.stages, self.every, self.current = stages, every, -1

    def stage_at(self, step: int) -> int:
        return min(step // self.every, len(self.stages) - 1)

    def on_step_start(self, step, model, optimizer) -> None:
        stage = self.stage_at(step)
        if stage != self.current:
            set_trainable(model, [n for s in self.stages[: stage + 1] for n in s])
            self.current = stage


def apply(model, ctx: Context) -> Prepared:
    p = parts(model, ctx.new_head)
    # stage 0: the head and what sits above the blocks (final norm); then each block from the top; embeddings last
    stages = [[*p.head, *p.top], *reversed(p.blocks), p.embeddings]
    stages = [s for s in stages if s]
    schedule = Unfreeze(stages, ctx.settings.unfreeze_every)
    schedule.on_step_start(0, model, None)
    return Prepared(model, callbacks=[schedule],
                    note=f"head first, one more of {len(stages) - 1} groups every {ctx.settings.unfreeze_every} "
                         f"steps (all train from step {(len(stages) - 1) * ctx.settings.unfreeze_every})")
