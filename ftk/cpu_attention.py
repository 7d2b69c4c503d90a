"""Attention for bf16 training on a CPU: three bf16 matmuls instead of torch's CPU flash-attention kernel.

Why: on this machine (AVX-512 BF16, torch 2.13) the CPU flash kernel behind scaled_dot_product_attention runs
the backward of a (8 x 6 heads x 256 x 64) causal attention at about 70 GFLOP/s, a fifth of the bf16 matmul
peak; attention was 20% of a training step of scripts/bench_throughput.py's 14M GPT-2 for 8% of its FLOPs.
Written as scores = q k^T, softmax, p v with oneDNN bf16 matmuls it takes 16 ms instead of 34 ms, forward and
backward. The price is precision: the scores are rounded to bf16 before the softmax (as in transformers'
eager attention on a bf16 model), where the flash kernel keeps them in fp32 - about 1.7x its relative error
(9e-3 against 5e-3 on the output, both at bf16's resolution).

It serves only what it is fast and exact for: training-shaped calls (a full sequence, no attention mask or
the block-diagonal causal mask of packed rows - ftk.data.packing -, no attention dropout) on CPU bf16 tensors, up to ftk.hardware.MAX_ATTENTION_PROBS_BYTES of probabilities
per layer. Packed rows are computed example by example (`SegmentAttention`): each example's own causal attention,
none of the cross-example scores a masked full-row attention would compute and discard. Anything else -
padding masks, generation with a KV cache, fp32, CUDA, long sequences - goes to
transformers' own SDPA function unchanged. Masks are built as for SDPA. The name is
registered with transformers' AttentionInterface and set on the model object only: a saved config does
not record it (transformers drops `_attn_implementation` on save), so checkpoints load with plain
transformers as SDPA models.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ftk.hardware import probs_bytes

NAME = "ftk_cpu_matmul"

_causal_masks: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def _future(length: int, device: torch.device) -> torch.Tensor:
    """True above the diagonal: the keys a causal query may not see (cached per length)."""
    key = (length, device)
    if key not in _causal_masks:
        _causal_masks[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return _causal_masks[key]


class MatmulAttention(torch.autograd.Function):
    """softmax(scale * q k^T [+ causal mask]) v with a hand-written backward that saves only q, k, v and p."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if causal:
            scores.masked_fill_(_future(q.shape[-2], q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # accumulates in fp32 inside the kernel, stores bf16
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None


class SegmentAttention(torch.autograd.Function):
    """Causal attention inside each segment (row, start, end) of packed rows, nothing across them: the
    block-diagonal causal mask without computing the blocks it masks. Every position lies in one segment (a
    row's padding is a segment of its own). Inputs are made contiguous once, so each segment's q, k, v are
    plain strided views the matmuls read without copies; results are written into contiguous buffers."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, segments):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        probs = []
        for row, start, end in segments:
            s = slice(start, end)
            scores = torch.matmul(q[row, :, s], k[row, :, s].transpose(-1, -2)).mul_(scale)
            scores.masked_fill_(_future(end - start, q.device), float("-inf"))
            p = torch.softmax(scores, dim=-1)
            out[row, :, s] = torch.matmul(p, v[row, :, s])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale, ctx.segments = scale, segments
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, *probs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        for (row, start, end), p in zip(ctx.segments, probs):
            s = slice(start, end)
            g = grad_out[row, :, s]
            grad_v[row, :, s] = torch.matmul(p.transpose(-1, -2), g)
            grad_p = torch.matmul(g, v[row, :, s].transpose(-1, -2))
            grad_scores = torch._softmax_backward_data(grad_p, p, -1, p.dtype).mul_(ctx.scale)
            grad_q[row, :, s] = torch.matmul(grad_scores, k[row, :, s])
            grad_k[row, :, s] = torch.matmul(grad_scores.transpose(-1, -2), q[row, :, s])
        return grad_q, grad_k, grad_v, None, None


def packed_segments(mask: torch.Tensor) -> Optional[List[Tuple[int, int, int]]]:
    """(row, start, end) of each example when `mask` (batch, 1, q, k; True = attend) is exactly the
    block-diagonal causal mask transformers builds for packed rows; None for any other mask (padding)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != mask.shape[-2]:
        return None
    m = mask[:, 0]
    n = m.shape[-1]
    starts = torch.ones(m.shape[0], n, dtype=torch.bool, device=m.device)
    starts[:, 1:] = ~m.diagonal(offset=-1, dim1=-2, dim2=-1)
    seg = starts.cumsum(-1)
    expected = (seg[:, :, None] == seg[:, None, :]) & ~_future(n, m.device)
    if not torch.equal(m, expected):
        return None
    segments = []
    for row in range(m.shape[0]):
        bounds = torch.nonzero(starts[row]).flatten().tolist() + [n]
        segments += [(row, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return segments


def serves(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float,
           kwargs: Dict[str, Any]) -> bool:
    """Whether this call is one the matmul path computes exactly as SDPA would (up to bf16 rounding), apart
    from its mask: attention_forward serves no mask or a packed rows' one (`packed_segments`), nothing else."""
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and key.dtype == torch.bfloat16
            and not dropout and query.shape[-2] == key.shape[-2]
            and query.shape[1] == key.shape[1]  # grouped-query attention goes to SDPA
            and probs_bytes(query.shape[0], query.shape[1], query.shape[2], query.element_size()) > 0
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = packed_segments(attention_mask) if attention_mask is not None else None
    if not serves(query, key, attention_mask, dropout, kwargs) or (attention_mask is not None and segments is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[-2] > 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if segments is not None:  # packed rows: each example's own causal attention
        out = SegmentAttention.apply(query, key, value, float(scale), segments)
        return out.transpose(1, 2).contiguous(), None
    out = MatmulAttention.apply(query, key, value, float(scale), causal)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME a valid attn_implementation (idempotent), with SDPA's mask construction."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(NAME, sdpa_mask)


def use_matmul_attention(model: Any) -> bool:
    """Route a model's SDPA attention through `attention_forward`; False (and no change) for any other model."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" \
            or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return getattr(model.config, "_attn_implementation", None) == NAME
