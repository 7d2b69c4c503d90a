"""ftk.objectives.linear_cross_entropy: the fused head-and-loss equals the model's own logits followed by
F.cross_entropy, in value and in every gradient (hidden states, head weight, bias), for fp32 and under bf16
autocast, over several chunks; the clm, sft and mlm objectives take it for GPT-2, Llama and BERT and give the
plain loss and gradients; and models whose logits are not head(hidden) keep the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import ftk.objectives as objectives
from ftk.objectives.linear_cross_entropy import headless, linear_cross_entropy, output_head


def case(seed=0, rows=300, hidden=24, vocab=700, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    b = torch.randn(vocab, generator=g) if bias else None
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::5] = -100
    return h, w, b, t


def grads(fn, h, w, b, t):
    leaves = [x.clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    total = fn(*leaves[:2], leaves[2] if b is not None else None, t)
    (total * 0.5).backward()
    return total.detach(), [x.grad for x in leaves]


def plain(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_are_the_plain_heads(monkeypatch, autocast, bias):
    monkeypatch.setattr(objectives, "HEAD_CHUNK_BYTES", 1)
    monkeypatch.setattr(objectives, "HEAD_MIN_ROWS", 128)  # 300 rows: chunks of 128, 128 and 44
    h, w, b, t = case(bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value, got = grads(linear_cross_entropy, h, w, b, t)
        expected, want = grads(plain, h, w, b, t)
        with torch.no_grad():  # validation: the loss alone, the same value
            assert torch.allclose(linear_cross_entropy(h, w, b, t), value, rtol=1e-6)
    assert value.dtype == torch.float32
    assert torch.allclose(value, expected, rtol=1e-5 if not autocast else 2e-3)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        tolerance = 1e-5 if not autocast else 2e-2  # bf16: the matmuls' roundings, in another order
        assert float((g - r).norm() / r.norm()) < tolerance


def tiny(kind):
    """A tiny model in eval mode: no dropout, so two forwards are the same function (gradients still flow)."""
    torch.manual_seed(0)
    return _tiny(kind).eval()


def _tiny(kind):
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                            max_position_embeddings=64, tie_word_embeddings=False))
    return BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=300, max_position_embeddings=64))


def objective(name):
    from types import SimpleNamespace

    if name == "clm":
        from ftk.objectives.clm import CausalLM
        return CausalLM()
    if name == "sft":
        from ftk.objectives.sft import SupervisedFineTuning
        return SupervisedFineTuning()
    from ftk.objectives.mlm import MaskedLM

    class Tokenizer:  # what MaskedLM reads of a tokenizer
        mask_token_id, all_special_ids = 4, [0, 1, 2, 3, 4]

        def __len__(self):
            return 300

    settings = SimpleNamespace(mlm_probability=0.3, mask_replace_prob=0.8, random_replace_prob=0.1)
    return MaskedLM(settings, Tokenizer())


def batch(name, obj):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    if name == "clm":
        return {"input_ids": ids, "attention_mask": mask}
    if name == "sft":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :6] = -100  # the prompt
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return obj.inputs(ids, g)


def reference_loss(name, model, inputs):
    """The plain path: the model's full logits, then F.cross_entropy on the positions with a target."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
    if name == "mlm":
        targets = inputs["labels"]
    else:
        source = inputs["labels"] if name == "sft" else inputs["input_ids"]
        targets = F.pad(source[:, 1:], (0, 1), value=-100)
        targets = targets.masked_fill(F.pad(inputs["attention_mask"][:, 1:], (0, 1), value=0) == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


@pytest.mark.parametrize("name,kind", [("clm", "gpt2"), ("clm", "llama"), ("sft", "llama"), ("mlm", "bert")])
def test_objectives_use_the_fused_head_with_the_plain_loss_and_gradients(name, kind):
    model = tiny(kind)
    head = output_head(model)
    assert head is model.get_output_embeddings()  # GPT-2 tied, Llama untied, BERT with a bias
    obj = objective(name)
    inputs = batch(name, obj)
    total, count = obj.loss(model, inputs)
    total.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = reference_loss(name, model, inputs)
    expected.backward()
    assert torch.allclose(total, expected, rtol=1e-5)
    assert int(count) == obj.targets(inputs)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(fused[n], p.grad, atol=1e-6, rtol=1e-4), n
    with torch.no_grad():  # after the loss, the model is a plain model again: logits, not hidden states
        assert model(input_ids=inputs["input_ids"]).logits.shape[-1] == 300


def test_models_whose_logits_are_not_head_of_hidden_keep_the_plain_path():
    model = tiny("llama")
    model.config.final_logit_softcapping = 30.0  # as Gemma 2: a transform after the head
    assert output_head(model) is None
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert output_head(lora) is None  # an adapter on the head: its output is not weight @ hidden
    plain_lora = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert output_head(plain_lora) is plain_lora.get_base_model().lm_head


def test_headless_returns_the_hidden_states_only_inside():
    model = tiny("gpt2")
    ids = torch.randint(0, 300, (1, 8))
    head = output_head(model)
    with torch.no_grad():
        with headless(head):
            hidden = model(input_ids=ids).logits
        logits = model(input_ids=ids).logits
    assert hidden.shape[-1] == 32 and logits.shape[-1] == 300
    assert torch.allclose(head(hidden), logits, atol=1e-6)
