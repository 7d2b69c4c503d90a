"""Training objectives: each turns a batch of token blocks into model inputs and a summed loss.

Losses are returned as (sum, count) so the loop can weight every target token equally across
micro-batches, devices and gradient-accumulation steps, whatever their share of masked tokens.
"""

from __future__ import annotations

from typing import Any

# Rows of logits ftk.objectives.cross_entropy handles at a time (here so the memory planner reads it without
# importing torch): 256 x 8,192 float32 logits = 8 MiB, a working set near the caches.
LOSS_CHUNK_ROWS = 256

# The fused head and loss (ftk.objectives.linear_cross_entropy) projects this many bytes of float32 logits at a
# time: 2,048 rows of an 8,192 vocabulary. Each chunk re-reads the head's weights and adds its share of their
# gradient (vocab x hidden), so rows stay at least HEAD_MIN_ROWS: with 128 rows of a 128k vocabulary the fused
# step was 1.13x slower than the plain logits, with 512 rows 0.71x (scripts/bench_finetune.py's head, 2,048
# tokens, width 256, bf16, on this CPU); 512 rows of a 128k vocabulary are 256 MiB of float32.
HEAD_CHUNK_BYTES = 64 * 2**20
HEAD_MIN_ROWS = 512


def head_chunk_rows(vocab: int) -> int:
    """Token rows per chunk of the fused head and loss: a power of two, HEAD_CHUNK_BYTES of float32 logits."""
    rows = HEAD_MIN_ROWS
    while rows * 2 * vocab * 4 <= HEAD_CHUNK_BYTES:
        rows *= 2
    return rows


def token_logits(model: Any, inputs: Any):
    """The model's logits, one row per input token. Under prompt tuning peft prepends the soft prompt's
    virtual tokens to the sequence, so its logits are longer than the input: those leading positions are
    the prompt's, not the text's, and carry no target."""
    ids = inputs["input_ids"]
    # Packed rows (ftk.data.packing) carry position ids restarting per example and no attention mask; without a
    # cache (which models create by default, even in training) transformers reads them as packed sequences.
    extra = {"position_ids": inputs["position_ids"], "use_cache": False} if "position_ids" in inputs else {}
    logits = model(input_ids=ids, attention_mask=inputs.get("attention_mask"), **extra).logits
    return logits[:, -ids.shape[1]:] if logits.shape[1] != ids.shape[1] else logits


def get_objective(settings: Any, tokenizer: Any):
    """The objective the `objective` config group names (its row in ftk/objectives/table.py)."""
    from ftk.objectives.table import build

    return build(settings, tokenizer)
