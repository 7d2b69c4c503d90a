"""Training objectives: each turns a batch of token blocks into model inputs and a summed loss.

Losses are returned as (sum, count) so the loop can weight every target token equally across
micro-batches, devices and gradient-accumulation steps, whatever their share of masked tokens.
"""

from __future__ import annotations

from typing import Any

from ftk.schemas import Objective

# Rows of logits ftk.objectives.cross_entropy handles at a time (here so the memory planner reads it without
# importing torch): 256 x 8,192 float32 logits = 8 MiB, a working set near the caches.
LOSS_CHUNK_ROWS = 256


def token_logits(model: Any, inputs: Any):
    """The model's logits, one row per input token. Under prompt tuning peft prepends the soft prompt's
    virtual tokens to the sequence, so its logits are longer than the input: those leading positions are
    the prompt's, not the text's, and carry no target."""
    ids = inputs["input_ids"]
    logits = model(input_ids=ids, attention_mask=inputs.get("attention_mask")).logits
    return logits[:, -ids.shape[1]:] if logits.shape[1] != ids.shape[1] else logits


def get_objective(cfg: Any, tokenizer: Any):
    """The objective named by the `objective` config group."""
    name = Objective(cfg.name)
    if name is Objective.clm:
        from ftk.objectives.clm import CausalLM

        return CausalLM()
    if name is Objective.mlm:
        from ftk.objectives.mlm import MaskedLM

        return MaskedLM(tokenizer, cfg.mlm_probability, cfg.mask_replace_prob, cfg.random_replace_prob)
    if name is Objective.classification:
        from ftk.objectives.classification import Classification

        return Classification()
    if name is Objective.sft:
        from ftk.objectives.sft import SupervisedFineTuning

        return SupervisedFineTuning()
    raise ValueError(f"unknown objective {name}")
