"""Tensor placement on an accelerator, without one: the model and its inputs live on PyTorch's `meta` device,
which (like CUDA) refuses to stack its tensors with CPU tensors, so a count made on the host fails here
exactly as it does at the first validation of a CUDA run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


class MetaAccelerator:
    """The slice of accelerate.Accelerator that `train.evaluate` uses, with its device on `meta`. `reduce`
    keeps what it was given and returns zeros on the host, as a single process would return the sums."""

    device = torch.device("meta")
    num_processes, process_index = 1, 0
    is_fsdp2 = False

    def __init__(self):
        self.reduced = []

    def unwrap_model(self, model, keep_fp32_wrapper=True, keep_torch_compile=True):
        return model

    def reduce(self, tensor, reduction="sum"):
        self.reduced.append(tensor)
        return torch.zeros(tensor.shape, dtype=tensor.dtype)


class Batches:
    def __init__(self, batches):
        self.batches = batches

    def validation_batches(self, batch_size, limit):
        return iter(self.batches)


def _classifier(kind: str):
    """A tiny real classifier on `meta`. Eager attention: the SDPA mask builders call .item(), which a meta
    tensor has no value for (BERT's builder does so in eager mode too, so it is not among the kinds)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    if kind == "gpt2":
        cls, config = GPT2ForSequenceClassification, GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                                n_positions=32, num_labels=3, pad_token_id=0,
                                                                bos_token_id=1, eos_token_id=1)
    else:
        cls, config = LlamaForSequenceClassification, LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=64, num_labels=3, pad_token_id=0)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        return cls(config)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_classification_validation_keeps_every_sum_on_the_accelerator(kind):
    from ftk.objectives.classification import Classification
    from ftk.train import evaluate

    model = _classifier(kind)
    batch = {"input_ids": torch.randint(1, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 0])}
    accelerator = MetaAccelerator()
    # Before the fix: "Tensor on device cpu is not on the expected device meta!" (on CUDA: a device mismatch).
    evaluate(model, Classification(), Batches([batch, batch]), 4, 0, 0, accelerator)
    assert [t.device.type for t in accelerator.reduced] == ["meta"]

    loss_sum, count = Classification().loss(model, {k: v.to("meta") for k, v in batch.items()})
    assert loss_sum.device == count.device == torch.device("meta")


def test_merge_probe_feeds_a_model_on_an_accelerator_its_own_device():
    """merge-adapter's QLoRA check loads the 4-bit base onto the GPU when there is one; its probe inputs are
    made on the host and must follow the model (with host inputs the check failed and was skipped)."""
    from ftk.merge_probe import Probe, probe_logits

    model = _classifier("llama")  # a classifier's logits need no boolean mask, which meta tensors cannot index
    ids = torch.randint(1, 64, (2, 8))
    probe = Probe(length=8, batches=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    logits = probe_logits(model, probe, to_host=False)  # meta tensors have no values to bring back
    assert logits[0].device.type == "meta" and tuple(logits[0].shape) == (2, 3)
