"""ftk.objectives.cross_entropy: the chunked summed cross-entropy is F.cross_entropy(logits.float(), sum) in
value and gradient, for float32 and bf16 logits, with ignored targets and a row count off the chunk size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftk.objectives import cross_entropy
from ftk.objectives.cross_entropy import summed_cross_entropy


def case(dtype, rows=600, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::7] = -100  # ignored positions (padding, prompts, unmasked tokens)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_and_gradient_are_cross_entropys(dtype, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_ROWS", 256)  # 600 rows: two full chunks and a partial one
    logits, targets = case(dtype)
    mine, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    total = summed_cross_entropy(mine, targets)
    expected = F.cross_entropy(ref.float(), targets, ignore_index=-100, reduction="sum")
    assert total.dtype == torch.float32
    assert torch.allclose(total, expected, rtol=1e-5)
    (total * 0.5).backward()
    (expected * 0.5).backward()
    assert mine.grad.dtype == dtype  # the gradient is written once, in the logits' dtype
    tolerance = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of the same float32 value
    assert torch.allclose(mine.grad.float(), ref.grad.float(), atol=tolerance, rtol=0)
    assert mine.grad[::7].abs().max() == 0  # ignored rows get no gradient


def test_all_ignored_and_no_grad():
    logits, targets = case(torch.float32, rows=10)
    assert float(summed_cross_entropy(logits, torch.full_like(targets, -100))) == 0.0
    with torch.no_grad():
        value = summed_cross_entropy(logits, targets)
    assert torch.allclose(value, F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"), rtol=1e-5)
