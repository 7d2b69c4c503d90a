"""The cheap training-step savings are exact: the causal-LM loss without slicing the logits is the sliced one,
and the fused tanh GELU swapped in for GPT-2's gelu_new computes the same function and gradients, saves the
same model and leaves the config alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from ftk.hardware import use_fused_kernels
from ftk.objectives.clm import CausalLM


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    assert config.activation_function == "gelu_new"
    return GPT2LMHeadModel(config)


def sliced_loss(model, inputs):
    """The loss as it was computed before: logits[:, :-1] against ids[:, 1:]."""
    ids = inputs["input_ids"]
    logits = model(input_ids=ids, attention_mask=inputs.get("attention_mask")).logits
    targets = ids[:, 1:]
    if "attention_mask" in inputs:
        targets = targets.masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                            targets.flatten(), ignore_index=-100,
                            reduction="sum")
    return total, (targets != -100).sum()


def test_clm_loss_without_slicing_the_logits_is_the_sliced_one():
    model = tiny_gpt2().double()
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        total, count = CausalLM().loss(model, inputs)
        ref_total, ref_count = sliced_loss(model, inputs)
        assert int(count) == int(ref_count) == CausalLM().targets(inputs)
        assert torch.allclose(total, ref_total, rtol=1e-6)
        grads = torch.autograd.grad(total, list(model.parameters()))
        ref = torch.autograd.grad(ref_total, list(model.parameters()))
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(grads, ref))
    assert int(CausalLM().loss(model, {"input_ids": ids, "attention_mask": mask})[1]) == 19 + 11 + 4


def test_fused_gelu_is_the_same_function_and_gradient(tmp_path):
    model, fused = tiny_gpt2(), tiny_gpt2()
    assert use_fused_kernels(fused) == 2  # one per block
    assert use_fused_kernels(fused) == 0  # idempotent
    assert isinstance(fused.transformer.h[0].mlp.act, torch.nn.GELU)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    a, b = CausalLM().loss(model, {"input_ids": ids})[0], CausalLM().loss(fused, {"input_ids": ids})[0]
    assert torch.allclose(a, b, rtol=1e-6)
    ga = torch.autograd.grad(a, list(model.parameters()))
    gb = torch.autograd.grad(b, list(fused.parameters()))
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(ga, gb))
    # Only module objects changed: the saved config still says gelu_new and the weights load unchanged.
    fused.save_pretrained(tmp_path, safe_serialization=True)
    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert again.config.activation_function == "gelu_new"
    assert torch.allclose(CausalLM().loss(again, {"input_ids": ids})[0], a, rtol=1e-6)


class TwoProcessAccelerator:
    """What `accumulate_gradients` asks of accelerate, as rank 0 of two processes whose peer sent `peer` (the
    same vector shape). Counts the collectives a step makes."""

    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, peer_stop: bool):
        self.reduces = []
        self.peer_stop = peer_stop

    def reduce(self, tensor, reduction="sum"):
        self.reduces.append(tensor.clone())
        peer = tensor.clone()
        if tensor.numel() > 1:
            peer[3] = float(self.peer_stop)  # the other process saw SIGTERM this step
        return tensor + peer

    def no_sync(self, model):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def test_a_step_makes_two_collectives_and_agrees_on_stopping_in_the_second():
    """Issue 16 finding 11: the count before the backward passes, then one vector (loss, tokens, stop flags);
    no separate stop vote, and a peer's SIGTERM stops this process at the same step."""
    from ftk.train import accumulate_gradients

    model = tiny_gpt2()
    objective = CausalLM()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    micro = [{"input_ids": ids[:1], "attention_mask": torch.ones_like(ids[:1])},
             {"input_ids": ids[1:], "attention_mask": torch.ones_like(ids[1:])}]
    for peer_stop in (False, True):
        acc = TwoProcessAccelerator(peer_stop)
        loss, tokens, _, (time_up, stop_now) = accumulate_gradients(model, model, objective, micro, acc, None, 0,
                                                                    lambda: (False, False))
        assert len(acc.reduces) == 2
        assert tokens == 64 and stop_now is peer_stop and time_up is False  # both ranks' tokens; the peer's flag
        assert loss > 0
