"""Forgetting: what fine-tuning costs the model's general language ability, and what holds it.

* `LanguageView` gives any fine-tuned model a language-model head: the base checkpoint's LM model
  whose body *is* the fine-tuned body (shared modules, not a copy; LoRA layers included, so the
  adapter's effect counts). A classifier's body is therefore measured by the same perplexity as
  the base model it came from.
* `perplexity` is token-weighted over fixed blocks of general text (CLM), or the masked-token
  perplexity with a fixed masking seed (MLM), each computed by its objective (ftk/objectives/).
* `Replay` and `L2SP` are extra losses for the training loop (`extra_loss(model, step)`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ftk.data.sampler import BlockStream
from ftk.schemas import Objective


def body(model: Any) -> torch.nn.Module:
    """The transformer body (GPT2Model, LlamaModel, BertModel) of a transformers or peft model."""
    if hasattr(model, "get_base_model"):  # peft: the transformers model, with LoRA layers injected
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def language_view(finetuned: Any, base_lm: Any) -> Any:
    """`base_lm` (the base checkpoint with its LM head) with its body replaced by the fine-tuned body."""
    setattr(base_lm, base_lm.base_model_prefix, body(finetuned))
    if getattr(base_lm.config, "tie_word_embeddings", False):
        base_lm.tie_weights()  # the LM head reads the fine-tuned embeddings, as the base's read its own
    for p in base_lm.parameters():  # only what the fine-tuned model trains may train
        if not any(p is q for q in body(finetuned).parameters()):
            p.requires_grad_(False)
    return base_lm


def lm_loss(model: Any, blocks: torch.Tensor, objective: Objective, generator: Optional[torch.Generator] = None,
            tokenizer: Any = None, device: Any = None):
    """(sum, count) of the language-model loss on CPU `blocks` under `objective` (clm or mlm), computed by that
    objective itself, so forgetting, replay and `ftk evaluate` measure a model the same way (MLM: its
    masking drawn from `generator` on the CPU, whatever the model's device; None = the model's)."""
    from ftk.objectives.table import build, settings_of

    lm = build(settings_of(Objective(objective).value), tokenizer)
    device = device if device is not None else next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in lm.inputs(blocks, generator).items()}
    return lm.loss(model, inputs)


@torch.no_grad()
def perplexity(model: Any, blocks: np.ndarray, objective: Objective, batch_size: int, device: Any,
               tokenizer: Any = None, seed: int = 0, precision: str = "fp32") -> float:
    """Token-weighted perplexity on `blocks`; with precision bf16/fp16 under autocast, as the model trained, so a
    16-bit frozen base is read as it is, never upcast (a 7B base in float32 would not fit the GPU it trained on)."""
    autocast = precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=autocast):
        return _perplexity(model, blocks, objective, batch_size, device, tokenizer, seed)


def _perplexity(model: Any, blocks: np.ndarray, objective: Objective, batch_size: int, device: Any,
                tokenizer: Any, seed: int) -> float:
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = torch.from_numpy(np.asarray(blocks[start:start + batch_size], dtype=np.int64))
        loss_sum, n = lm_loss(model, batch, objective, generator, tokenizer, device)
        total += float(loss_sum)
        count += int(n)
    model.train(was_training)
    return math.exp(min(total / max(count, 1), 50.0))


class Replay:
    """Each step, `n` blocks of general text go through the language view; their mean LM loss, weighted
    by fraction/(1-fraction), joins the task loss. Blocks are drawn by step from a seeded stream, so a
    resumed run replays what the uninterrupted one would."""

    def __init__(self, view: Any, blocks: np.ndarray, per_step: int, fraction: float, objective: Objective,
                 seed: int, tokenizer: Any):
        self.view, self.blocks, self.per_step = view, blocks, per_step
        self.weight = fraction / (1.0 - fraction)
        self.objective, self.seed, self.tokenizer = objective, seed, tokenizer
        self.stream = BlockStream(len(blocks), seed + 7919)

    def __call__(self, model: Any, step: int) -> torch.Tensor:
        idx = np.sort(self.stream.take(step * self.per_step, self.per_step))
        batch = torch.from_numpy(np.asarray(self.blocks[idx], dtype=np.int64))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        loss_sum, count = lm_loss(self.view, batch, self.objective, generator, self.tokenizer)
        return self.weight * loss_sum / count.clamp(min=1)


class L2SP:
    """alpha/2 * sum ||w - w0||^2 over trainable weights that came from the pretrained model (Li et al. 2018),
    anchored at their pretrained values; the new head and adapters are free."""

    def __init__(self, model: Any, alpha: float, new_head: List[str]):
        self.alpha = alpha
        skip = set(new_head)
        self.anchors: Dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters()
            if name not in skip and "lora_" not in name and "modules_to_save" not in name}

    def __call__(self, model: Any, step: int) -> torch.Tensor:
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and name in self.anchors:
                anchor = self.anchors[name]
                if anchor.device != p.device:  # once: the anchors are taken before the model goes to the GPU
                    anchor = self.anchors[name] = anchor.to(p.device)
                terms.append(((p - anchor) ** 2).sum())
        if not terms:
            return torch.zeros(())
        return 0.5 * self.alpha * torch.stack(terms).sum()


def combine(*losses: Any):
    active = [f for f in losses if f is not None]
    if not active:
        return None
    return lambda model, step: sum(f(model, step) for f in active)
