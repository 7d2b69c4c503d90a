"""QLoRA on CPU: a 4-bit NF4 base (bitsandbytes) + LoRA trains, evaluates, and trains again.

Tiny GPT-2 models built from a config (no download). The sequence train -> eval (no_grad) -> train used to
fail on CPUs with AVX512-BF16: bitsandbytes repacks a 4-bit layer's weight for inference in eval mode and
never converts it back (see ftk/regimes/qlora_base.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from ftk.regimes.qlora_base import is_cpu_packed, keep_4bit_trainable, load_4bit_base  # noqa: E402

VOCAB = 300
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
SPECIAL = dict(bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)  # GPT2Config's defaults (50256) exceed VOCAB


def tiny_gpt2(path, **config) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, **NO_DROPOUT, **{**SPECIAL, **config})
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def causal_lm(path, compute_dtype=torch.float32, **load_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = load_4bit_base(path, AutoModelForCausalLM, compute_dtype, **load_kwargs)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"])
    return peft.get_peft_model(base, lora)


def classifier(path, compute_dtype=torch.float32, **load_kwargs):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    base, info = load_4bit_base(path, AutoModelForSequenceClassification, compute_dtype, num_labels=3,
                                output_loading_info=True, **load_kwargs)
    assert {"score.weight"} <= set(info["missing_keys"])  # a new head, initialised here
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"])
    return peft.get_peft_model(base, lora)


def lm_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (4, 32), generator=g)
    return dict(input_ids=ids, labels=ids)


def cls_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 18:], mask[1, 18:] = 0, 0  # right padding with pad_token_id=0: the head reads the last real token
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1]))


def four_bit_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def snapshot_4bit(model):
    """Every tensor that defines the frozen 4-bit weights: packed data and (double-quantized) statistics."""
    snap = {}
    for name, m in four_bit_layers(model).items():
        qs = m.weight.quant_state
        tensors = [m.weight.data, qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
        snap[name] = [t.detach().clone() for t in tensors]
    return snap


def assert_same_4bit(before, after):
    assert before.keys() == after.keys() and before
    for name in before:
        for a, b in zip(before[name], after[name]):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_step(model, opt, batch) -> float:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train_eval_train(model, batch):
    """The sequence under test; returns (losses, eval logits, train-mode logits)."""
    params = trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = [train_step(model, opt, batch)]
    model.eval()
    with torch.no_grad():
        eval_logits = model(**batch).logits
    model.train()  # dropout is 0 everywhere: train mode computes the same function
    train_logits = model(**batch).logits.detach()
    losses.append(train_step(model, opt, batch))
    losses.append(train_step(model, opt, batch))
    return losses, eval_logits, train_logits


def check_qlora_run(model, batch, extra_trainable=()):
    layers = four_bit_layers(model)
    assert layers and all(not m.weight.requires_grad for m in layers.values())
    params = trainable(model)
    assert params and all("lora_" in n or any(k in n for k in extra_trainable) for n in params), list(params)
    assert any("lora_" in n for n in params)
    start = {n: p.detach().clone() for n, p in params.items()}
    frozen = snapshot_4bit(model)

    losses, eval_logits, train_logits = train_eval_train(model, batch)

    assert all(math.isfinite(x) for x in losses), losses
    for n, p in params.items():
        assert not torch.equal(start[n], p.detach()), f"{n} did not change"
    assert not any(is_cpu_packed(m) for m in layers.values())
    assert_same_4bit(frozen, snapshot_4bit(model))
    torch.testing.assert_close(eval_logits, train_logits, rtol=1e-5, atol=1e-5)
    return losses


def test_qlora_causal_lm_train_eval_train(tmp_path):
    model = causal_lm(tiny_gpt2(tmp_path / "gpt2"))
    # Conv1D blocks (c_attn, c_proj, c_fc) are 4-bit; the tied lm_head stays full precision.
    names = four_bit_layers(model)
    assert len(names) == 2 * 4 and not any("lm_head" in n for n in names)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    losses = check_qlora_run(model, lm_batch())
    assert losses[-1] < losses[0]
    keep_4bit_trainable(model)  # idempotent, also on the peft-wrapped model
    keep_4bit_trainable(model)
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit_layers(model).values())


def test_qlora_sequence_classification_head_stays_full_precision(tmp_path):
    model = classifier(tiny_gpt2(tmp_path / "gpt2", pad_token_id=0), compute_dtype=torch.bfloat16)
    assert not any("score" in n for n in four_bit_layers(model))
    head = model.base_model.model.score  # peft's ModulesToSaveWrapper around the new head
    trained_head = head.modules_to_save["default"]
    assert type(trained_head) is torch.nn.Linear and trained_head.weight.dtype == torch.float32
    assert trained_head.weight.requires_grad
    losses = check_qlora_run(model, cls_batch(), extra_trainable=("score.modules_to_save",))
    assert losses[-1] < losses[0]


needs_avx512_bf16 = pytest.mark.skipif(
    not (torch.cpu._is_avx512_bf16_supported() and bnb.functional.has_avx512bf16()),
    reason="bitsandbytes repacks 4-bit weights in eval mode only on CPUs with AVX512-BF16")


@needs_avx512_bf16
def test_without_fix_eval_breaks_next_train_step_and_fix_repairs_it(tmp_path):
    model = causal_lm(tiny_gpt2(tmp_path / "gpt2"), keep_trainable=False)
    batch = lm_batch()
    opt = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    train_step(model, opt, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert all(is_cpu_packed(m) for m in four_bit_layers(model).values())
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        train_step(model, opt, batch)
    opt.zero_grad(set_to_none=True)

    # Installed late, the fix converts the repacked layers back (with a warning: their absmax went through bf16).
    with pytest.warns(RuntimeWarning, match="repacked"):
        keep_4bit_trainable(model)
    assert not any(is_cpu_packed(m) for m in four_bit_layers(model).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        keep_4bit_trainable(model)  # nothing left to repair: silent
    assert math.isfinite(train_step(model, opt, batch))
