"""Summed token cross-entropy over large-vocabulary logits, row chunk by row chunk.

`F.cross_entropy(logits.float(), ...)` on bf16 logits writes a float32 copy of the (tokens x vocab) logits,
its float32 log-softmax, a zero-filled float32 gradient and a bf16 copy of that: five passes over 64 MiB for
a batch of 2,048 tokens and a vocabulary of 8,192, about 9% of a training step of the 14M GPT-2 in
scripts/bench_throughput.py. Here each chunk of rows gets its log-softmax in float32 (one fused kernel) while
it is in cache, only each row's log-sum-exp is kept, and the backward writes the gradient once, in the
logits' own dtype - which is the dtype autograd would have cast it to anyway. Only the order of float32 roundings differs from
F.cross_entropy.
"""

from __future__ import annotations

import torch

from ftk.objectives import LOSS_CHUNK_ROWS

CHUNK_ROWS = LOSS_CHUNK_ROWS


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)[:, None]
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        picked = logits.gather(1, safe).squeeze(1).to(acc)
        nll = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            # One fused kernel reads the chunk in its own dtype and accumulates in `acc`.
            log_probs = torch.log_softmax(logits[rows], dim=-1, dtype=acc)
            nll[rows] = -log_probs.gather(1, safe[rows]).squeeze(1)
        ctx.save_for_backward(logits, safe, valid, picked + nll)  # the last: each row's log-sum-exp
        return (nll * valid).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = (valid.to(lse.dtype) * grad_total.to(lse.dtype))[:, None]  # ignored rows get no gradient
        minus_one = torch.full((min(CHUNK_ROWS, logits.shape[0]), 1), -1.0, dtype=lse.dtype, device=logits.device)
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            probs = torch.exp(torch.sub(logits[rows], lse[rows, None]))  # softmax, from the saved log-sum-exp
            n = probs.shape[0]
            probs.scatter_add_(1, safe[rows], minus_one[:n])
            torch.mul(probs, scale[rows], out=grad[rows])  # scaled and cast to the logits' dtype in one pass
        return grad, None, None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """sum over targets != ignore_index of -log softmax(logits)[target], in float32 (float64 for float64 logits);
    logits (N, V), targets (N,).

    Equal to F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")."""
    if logits.device.type != "cpu":  # CUDA's cross-entropy kernels are memory-bound passes at GPU bandwidth
        return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=ignore_index,
                                                 reduction="sum")
    return _SummedCrossEntropy.apply(logits, targets, ignore_index)
