"""Feature extraction: the pretrained body is a frozen feature extractor; only the new head trains."""

from ftk.regimes import Context, Prepared
from ftk.regimes.structure import set_trainable


def apply(model, ctx: Context) -> Prepared:
    set_trainable(model, ctx.new_head)
    return Prepared(model, note="body frozen; the new head trains")
