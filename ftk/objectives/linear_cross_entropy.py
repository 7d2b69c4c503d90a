"""The output head and the token cross-entropy in one pass, chunk of tokens by chunk: the full logits never exist.

For a 128k vocabulary the (tokens x vocab) logits of 8 x 2,048 tokens take 8 GiB in float32, more than the
weights of a small or medium model; in the plain path they exist in the head's dtype, again as float32
log-probabilities and once more as their gradient. Here each chunk of token rows goes through the head's
matmul, gets its log-softmax in float32, gives its loss and, when gradients are wanted, its gradient with
respect to the hidden states and its share of the head's weight gradient - all before the next chunk. The
backward pass then only scales what the forward computed (the loss is a sum, so its gradient is one number),
as Liger's fused linear cross-entropy does. Peak memory of the loss: one chunk of logits instead of three
copies of all of them.

Numerics follow the plain path: the matmuls run in the dtype autocast (or the weights) would have used, the
log-softmax accumulates in float32 (float64 for float64 inputs), the logits' gradient is rounded to the
matmul dtype before the two backward matmuls, as autograd would. Only the order of roundings differs.

`output_head(model)` says whether a model's logits are exactly `head(hidden)` (a plain nn.Linear head, no
logit soft-capping or scaling after it, not sharded by FSDP, no adapter on the head); `headless(head)` makes
the model's forward return the head's input in place of the logits, so the model still runs through every
wrapper (DDP, torch.compile, peft) exactly as before.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Tuple

import torch

from ftk.objectives import head_chunk_rows

# Config attributes of families whose logits are not exactly head(hidden): a transform follows the head
# (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling). Those keep the plain path.
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _inner(model: Any) -> Any:
    """The transformers model inside DDP, torch.compile and peft wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def output_head(model: Any) -> Optional[torch.nn.Linear]:
    """The model's output projection when its logits are exactly that Linear applied to the last hidden
    states; None otherwise (then the loss takes the model's logits)."""
    inner = _inner(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(inner, "config", None)
    if type(head) is not torch.nn.Linear or type(head.weight) is not torch.nn.Parameter:
        return None  # an adapter on the head (lora.Linear), a quantized or FSDP-sharded (DTensor) weight
    if config is not None and any(getattr(config, name, None) not in (None, 0, 1, 1.0) for name in _AFTER_HEAD):
        return None
    return head


def _passthrough_forward(head: torch.nn.Linear):
    original = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return x if head._ftk_headless else original(x)

    return forward


@contextlib.contextmanager
def headless(head: torch.nn.Linear) -> Iterator[None]:
    """Within: `head(x)` returns x, so the model's `.logits` are the hidden states the head would project.
    The head's parameters (and so state dicts, tying and optimizers) are untouched."""
    if not hasattr(head, "_ftk_headless"):
        head._ftk_headless = False
        head.forward = _passthrough_forward(head)
    head._ftk_headless = True
    try:
        yield
    finally:
        head._ftk_headless = False


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, dtype, rows):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            acc = torch.promote_types(dtype, torch.float32)
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)[:, None]
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
            grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) \
                if bias is not None and ctx.needs_input_grad[2] else None
            total = torch.zeros((), dtype=acc, device=h.device)
            for start in range(0, h.shape[0], rows):
                r = slice(start, start + rows)
                log_probs = torch.log_softmax(_chunk_logits(h[r], w, b), dim=-1, dtype=acc)
                keep = valid[r].to(acc)
                total -= (log_probs.gather(1, safe[r]).squeeze(1) * keep).sum()
                # d(sum of nll)/d(logits) = softmax - one_hot, zero on ignored rows; rounded to the matmul dtype
                grad = log_probs.exp_()
                grad.scatter_add_(1, safe[r], torch.full_like(safe[r], -1, dtype=acc))
                grad = grad.mul_(keep[:, None]).to(dtype)
                if grad_h is not None:
                    torch.matmul(grad, w, out=grad_h[r])
                if grad_w is not None:
                    grad_w += (grad.t() @ h[r]).to(acc)
                if grad_b is not None:
                    grad_b += grad.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = grad_total.to(torch.float32)
        # The loss is a sum: its gradients were computed in the forward and only scale here.
        out_h = (grad_h * scale.to(grad_h.dtype)).to(h_dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """sum over targets != ignore_index of -log softmax(hidden @ weight.T + bias)[target], in float32 (float64 for
    float64 inputs); hidden (N, H), weight (V, H), targets (N,). Never holds more than one chunk of the logits."""
    dtype = _matmul_dtype(hidden, weight)
    rows = head_chunk_rows(weight.shape[0])
    needs = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))
    if needs:
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, dtype, rows)
    with torch.no_grad():  # validation: the loss alone, chunk by chunk
        return _LinearCrossEntropy.forward(_NoGrad(), hidden, weight, bias, targets, ignore_index, dtype, rows)


class _NoGrad:
    """Stands in for autograd's context when no gradient is wanted: nothing is computed for the backward."""

    needs_input_grad = (False, False, False)

    def save_for_backward(self, *tensors: Any) -> None:
        pass


def summed_token_loss(model: Any, inputs: Any, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of targets) for `targets` (batch, seq) aligned with the input
    positions, -100 where a position has no target: through the fused head and loss where the model's logits
    are head(hidden), else from its logits (ftk.objectives.cross_entropy)."""
    from ftk.objectives import token_logits
    from ftk.objectives.cross_entropy import summed_cross_entropy

    keep = targets != -100
    head = output_head(model)
    if head is None:
        logits = token_logits(model, inputs)
        return summed_cross_entropy(logits[keep], targets[keep]), keep.sum()
    with headless(head):
        hidden = token_logits(model, inputs)
    return linear_cross_entropy(hidden[keep], head.weight, head.bias, targets[keep]), keep.sum()
