"""Prompt tuning (peft): a soft prompt of N trainable virtual tokens; every model weight stays frozen
(a new classification head, when there is one, trains and is saved with the prompt)."""

from ftk.regimes import Context, Prepared
from ftk.regimes.lora import task_type
from ftk.regimes.structure import head_modules


def apply(model, ctx: Context) -> Prepared:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    s = ctx.settings
    config = PromptTuningConfig(task_type=task_type(ctx.objective), num_virtual_tokens=s.num_virtual_tokens,
                                # initialised from embeddings of random vocabulary tokens: the scale the model expects
                                prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                                modules_to_save=head_modules(ctx.new_head) or None)
    wrapped = get_peft_model(model, config)
    return Prepared(wrapped, note=f"soft prompt of {s.num_virtual_tokens} virtual tokens; model weights frozen")
