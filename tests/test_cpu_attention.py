"""ftk.cpu_attention: the bf16 matmul attention computes SDPA's function and gradients (to bf16 resolution),
leaves every call it does not serve to SDPA untouched, is chosen by the hardware plan only for CPU bf16, and
never reaches a saved checkpoint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ftk import hardware
from ftk.cpu_attention import NAME, MatmulAttention, attention_forward, use_matmul_attention
from ftk.objectives.clm import CausalLM


def qkv(dtype, seed=0, shape=(2, 3, 40, 16)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * 2).to(dtype).requires_grad_() for _ in range(3)]


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("causal", [True, False])
def test_same_function_and_gradients_as_sdpa_to_bf16_resolution(causal):
    ref = qkv(torch.float32)
    out_ref = F.scaled_dot_product_attention(*ref, is_causal=causal)
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1))
    out_ref.backward(grad)
    test = qkv(torch.bfloat16)
    out = MatmulAttention.apply(*test, 16 ** -0.5, causal)
    out.backward(grad.bfloat16())
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 3.9e-3); SDPA's own bf16 kernel is at about 5e-3 here
    assert rel(out, out_ref) < 2e-2
    for t, r in zip(test, ref):
        assert rel(t.grad, r.grad) < 3e-2
    # A wrong mask or scale is far outside that: the non-causal result is not the causal one.
    other = F.scaled_dot_product_attention(*[x.detach() for x in ref], is_causal=not causal)
    assert rel(out, other) > 0.1


def test_calls_it_does_not_serve_go_to_sdpa_unchanged():
    module = SimpleNamespace(is_causal=True)
    q, k, v = [x.detach() for x in qkv(torch.float32)]
    mask = torch.ones(40, 40, dtype=torch.bool).tril()[None, None].expand(2, 1, 40, 40).clone()
    mask[1, :, :, 30:] = False
    cases = [dict(q=q, k=k, v=v, mask=None),  # fp32
             dict(q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16(), mask=mask),  # a padding mask
             dict(q=q[:, :, -1:].bfloat16(), k=k.bfloat16(), v=v.bfloat16(), mask=None)]  # one query, KV cache
    for c in cases:
        out, _ = attention_forward(module, c["q"], c["k"], c["v"], c["mask"])
        is_causal = c["mask"] is None and c["q"].shape[2] > 1
        expected = F.scaled_dot_product_attention(c["q"], c["k"], c["v"], attn_mask=c["mask"],
                                                  is_causal=is_causal).transpose(1, 2)
        assert torch.equal(out, expected)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def test_model_trains_the_same_and_saves_a_plain_sdpa_checkpoint(tmp_path):
    model, matmul = tiny_gpt2(), tiny_gpt2()
    assert use_matmul_attention(matmul)
    assert matmul.config._attn_implementation == NAME
    ids = torch.randint(0, 97, (4, 48), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = CausalLM().loss(model, {"input_ids": ids})
        b, _ = CausalLM().loss(matmul, {"input_ids": ids})
    assert abs(a.item() - b.item()) < 1e-2 * abs(a.item())
    ga = torch.autograd.grad(a, list(model.parameters()))
    gb = torch.autograd.grad(b, list(matmul.parameters()))
    assert rel(torch.cat([g.flatten() for g in gb]), torch.cat([g.flatten() for g in ga])) < 3e-2
    # With a padding mask the call goes to SDPA: the same numbers exactly.
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           matmul(input_ids=ids, attention_mask=mask).logits)
    # The choice lives on the model object only: the saved config does not carry it.
    matmul.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert again.config._attn_implementation == "sdpa"


def test_only_sdpa_models_are_switched():
    eager = AutoModelForCausalLM.from_config(tiny_gpt2().config, attn_implementation="eager")
    assert not use_matmul_attention(eager)
    assert eager.config._attn_implementation == "eager"


def hw(**overrides):
    fields = dict(device="cpu", precision="bf16", micro_batch_size=None, optimizer="auto", compile=None,
                  strategy="auto", matmul_attention=None)
    return SimpleNamespace(**{**fields, **overrides})


def test_plan_picks_matmul_attention_for_cpu_bf16_only_and_leaves_compile_off_on_a_cpu():
    plan = hardware.resolve(hw(), 8, hardware.COMPILE_MIN_STEPS)
    assert plan.matmul_attention and not plan.compile  # compile does not pay off on a CPU (ftk.hardware)
    assert not hardware.resolve(hw(precision="fp32"), 8, 10).matmul_attention  # the flash kernel is faster
    assert not hardware.resolve(hw(matmul_attention=False), 8, 10).matmul_attention
    assert hardware.resolve(hw(compile=True), 8, 10).compile
    assert plan.as_dict()["matmul_attention"] is True  # recorded in environment.json and the run summary


def test_planner_counts_the_probabilities_and_defers_long_sequences_to_sdpa():
    from ftk import planner

    from ftk.schemas import Family, ModelConfig

    shape = planner.shape_from_model_options(ModelConfig(family=Family.gpt2, hidden_size=384, num_layers=6,
                                                        num_heads=6, max_position_embeddings=2048), "test")
    for seq, batch in ((256, 8), (2048, 8)):
        setups = [planner.Setup(precision="bf16", micro_batch_size=batch, seq_len=seq, finetuning=False,
                               matmul_attention=m) for m in (False, True)]
        sdpa, matmul = (planner.estimate(shape, u) for u in setups)
        probs = hardware.probs_bytes(batch, 6, seq)
        if seq == 256:
            assert probs == 8 * 6 * 256 * 256 * 2
            assert matmul.activations - sdpa.activations == 6 * (probs - 6 * 4 * batch * seq)
        else:  # 8 x 6 x 2048^2 x 2 B = 384 MiB a layer: SDPA serves it, and the plan is SDPA's
            assert probs == 0 and matmul.activations == sdpa.activations
