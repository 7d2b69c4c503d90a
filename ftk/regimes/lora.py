"""LoRA (and QLoRA, whose 4-bit base ftk.regimes.qlora_base loads): peft low-rank adapters.

Target modules default to peft's choice for the model family; a new classification head (and any
other freshly initialised module, e.g. BERT's pooler) trains in full and is saved with the adapter.
`wrap` takes extra LoraConfig options, so LoRA variants (DoRA) are one line on top of it.
"""

from ftk.errors import UsageError, first_line
from ftk.regimes import Context, Prepared
from ftk.regimes.structure import head_modules


def task_type(objective) -> str:
    """peft's task_type for adapters trained with `objective` (its row in ftk/objectives/table.py)."""
    from ftk.objectives.table import facts

    return facts(objective).peft_task_type


def wrap(model, ctx: Context, method: str = "LoRA", **options) -> Prepared:
    """`model` under peft LoRA adapters built from the regime settings plus LoraConfig `options`."""
    from peft import LoraConfig

    s = ctx.settings
    config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                        target_modules=list(s.target_modules) if s.target_modules else None,
                        task_type=task_type(ctx.objective),
                        modules_to_save=head_modules(ctx.new_head) or None, **options)
    wrapped = get_peft_model(model, config, method)
    targets = sorted(wrapped.peft_config["default"].target_modules)
    return Prepared(wrapped, note=f"{method} r={s.lora_r} alpha={s.lora_alpha} on {', '.join(targets)}")


def get_peft_model(model, config, method: str):
    """peft's get_peft_model, with a target that matches nothing as one line naming the fix."""
    import peft

    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        first = first_line(exc)
        raise UsageError(f"{method} cannot wrap {type(model).__name__}: {first}; set regime.target_modules=[...] to "
                         "module names of the model") from None


def apply(model, ctx: Context) -> Prepared:
    return wrap(model, ctx)
