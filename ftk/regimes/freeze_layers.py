"""Layer freezing: the embeddings and the first k blocks stay as pretrained; the rest trains.

Lower layers hold the most general features, so freezing them keeps what transfers and halves the
gradient work; the upper blocks adapt to the task.
"""

from ftk.errors import UsageError
from ftk.regimes import Context, Prepared
from ftk.regimes.structure import parts, set_trainable


def apply(model, ctx: Context) -> Prepared:
    k = ctx.settings.freeze_layers
    p = parts(model, ctx.new_head)
    if k > len(p.blocks):
        raise UsageError(f"regime.freeze_layers={k} but the model has {len(p.blocks)} blocks; "
                         f"use regime.freeze_layers<={len(p.blocks)}")
    frozen = set(p.embeddings) | {n for block in p.blocks[:k] for n in block}
    set_trainable(model, [n for n in p.all() if n not in frozen])
    return Prepared(model, note=f"embeddings and blocks 0-{k - 1} frozen; blocks {k}-{len(p.blocks) - 1} "
                                f"and the head train" if k else "nothing frozen (regime.freeze_layers=0)")
