"""(IA)^3 (peft): learned vectors that rescale the keys, values and feed-forward activations (Liu et al.
2022); far fewer trainable parameters than LoRA, every model weight frozen. Merges exactly (a rescaling
folds into the weight it follows or precedes)."""

from ftk.regimes import Context, Prepared
from ftk.regimes.lora import get_peft_model, task_type
from ftk.regimes.structure import head_modules


def apply(model, ctx: Context) -> Prepared:
    from peft import IA3Config

    s = ctx.settings
    targets = list(s.target_modules) if s.target_modules else None
    # peft requires feed-forward modules to be among the targets: with targets of the user's own and no
    # feed-forward list, every target rescales its output
    feedforward = list(s.feedforward_modules) if s.feedforward_modules else ([] if targets else None)
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward,
                       task_type=task_type(ctx.objective), modules_to_save=head_modules(ctx.new_head) or None)
    wrapped = get_peft_model(model, config, "IA3")
    chosen = wrapped.peft_config["default"]
    return Prepared(wrapped, note=f"IA3 vectors on {', '.join(sorted(chosen.target_modules))} "
                                  f"(feed-forward: {', '.join(sorted(chosen.feedforward_modules)) or 'none'})")
