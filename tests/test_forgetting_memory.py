"""Measuring forgetting after a LoRA fine-tune with a 16-bit frozen base reads that base as it is: the trained
model is never upcast to float32 in place (on a 24 GB GPU a 7B base in float32 does not fit, and final/ was never
written), and the base's perplexity is measured in the same dtype, so the two figures differ by training only."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ftk, make_labelled, write_jsonl


@pytest.mark.parametrize("objective", ["classification", "clm"])
def test_forgetting_reads_a_bf16_lora_base_without_upcasting_it(objective, pretrained, tmp_path, monkeypatch):
    from ftk import forgetting

    seen = []  # (dtypes of the model's 2-D weights other than LoRA's, perplexity) per call
    real = forgetting.perplexity

    def spy(model, *args, **kwargs):
        frozen = {p.dtype for name, p in model.named_parameters() if "lora_" not in name and p.ndim == 2}
        value = real(model, *args, **kwargs)
        seen.append((frozen, value))
        return value

    monkeypatch.setattr(forgetting, "perplexity", spy)
    if objective == "classification":
        data = [f"data.path={write_jsonl(tmp_path / 'train.jsonl', make_labelled(96, seed=1))}"]
    else:
        data = [f"objective=clm", f"data.path={pretrained['corpus']}"]
    run = tmp_path / "run"
    # lr ~0: LoRA's B starts at zero, so the fine-tuned model computes what the base does.
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", "regime=lora", *data, "hardware=cpu",
               "hardware.precision=bf16", "train.batch_size=8", "train.seq_len=64", "train.max_steps=2",
               "train.lr=1e-12", "train.save_every=0", f"forgetting.data_path={pretrained['corpus']}",
               "forgetting.max_blocks=8", f"hydra.run.dir={run}") == 0
    assert len(seen) == 2
    (base_dtypes, base_ppl), (tuned_dtypes, tuned_ppl) = seen
    assert tuned_dtypes == {torch.bfloat16}, tuned_dtypes  # before the fix: float32, the whole model upcast in place
    assert base_dtypes == {torch.bfloat16}, base_dtypes
    summary = json.loads((run / "summary.json").read_text())["forgetting"]
    assert summary["finetuned_ppl"] == pytest.approx(summary["base_ppl"], rel=1e-3)
    assert (run / "final" / "adapter_model.safetensors").is_file()
