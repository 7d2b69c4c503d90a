"""Every final/ (and every merged model) carries a Hugging Face model card that huggingface_hub parses, and whose
loading snippet really loads the model."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import ftk, make_labelled, write_jsonl


def _snippet(card_text: str, folder) -> str:
    code = re.search(r"```python\n(.*?)```", card_text, flags=re.S).group(1)
    return code.replace("<this folder or repo id>", str(folder))


def test_pretrain_card_names_pipeline_metrics_command_data_and_config(pretrained):
    from huggingface_hub import ModelCard

    final = pretrained["gpt"]
    card = ModelCard.load(final / "README.md")
    summary = json.loads((final.parent / "summary.json").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "ftk" in card.data.tags and "clm" in card.data.tags and card.data.base_model is None
    got = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert got["validation loss"] == pytest.approx(summary["final_eval_loss"])
    assert got["validation perplexity"] == pytest.approx(summary["final_eval_ppl"])
    assert "ftk pretrain model=gpt-tiny" in card.text and "hydra.output_subdir" not in card.text
    assert f"data.path | {pretrained['corpus']}" in card.text and "| fingerprint | `sha256:" in card.text
    assert "hf upload <user>/<model-name>" in card.text and "train:\n  max_steps: 40" in card.text
    scope: dict = {}
    exec(_snippet(card.text, final), scope)  # the card's own snippet: plain transformers, generating text
    assert type(scope["model"]).__name__ == "GPT2LMHeadModel"


def test_lora_card_says_peft_forgetting_and_loads_with_peft_and_its_merge_has_a_card(pretrained, tmp_path):
    from huggingface_hub import ModelCard

    data = write_jsonl(tmp_path / "train.jsonl", make_labelled(60))
    run = tmp_path / "lora"
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", "regime=lora", f"data.path={data}",
               "hardware=cpu", "hardware.precision=fp32", "train.seq_len=32", "train.batch_size=8",
               "train.max_steps=4", "train.eval_batches=2", f"forgetting.data_path={pretrained['corpus']}",
               "forgetting.max_blocks=4", f"hydra.run.dir={run}") == 0
    card = ModelCard.load(run / "final" / "README.md")
    summary = json.loads((run / "summary.json").read_text())
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert {"lora", "classification", "finetune"} <= set(card.data.tags)
    assert "## Forgetting" in card.text and f"{summary['forgetting']['finetuned_ppl']:.3f}" in card.text
    names = {r.metric_name for r in card.data.eval_results}
    assert {"validation loss", "validation accuracy", "general-text perplexity after fine-tuning"} <= names
    scope: dict = {}
    exec(_snippet(card.text, run / "final"), scope)  # base from its folder + the adapter, num_labels from the card
    assert type(scope["model"]).__name__.startswith("PeftModel")
    assert scope["model"].base_model.model.config.num_labels == 3

    merged = tmp_path / "merged"
    assert ftk("merge-adapter", f"adapter_path={run / 'final'}", f"output_dir={merged}") == 0
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    assert card.data.model_name == "merged" and "How the adapter was trained" in card.text
    assert "README.md" in json.loads((merged / "merge.json").read_text())["files"]
    exec(_snippet(card.text, merged), scope)
    assert type(scope["model"]).__name__ == "GPT2ForSequenceClassification"
