"""`ftk evaluate eval=harness`: lm-evaluation-harness offline on local tasks (tiny model, data made here), base and
base + adapter, and the cross-check of its bits per byte against ftk's own perplexity."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ftk, make_corpus, make_labelled, write_jsonl

pytest.importorskip("lm_eval")

ROLLING = """task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
CHOICE = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}\\nAnswer:"
doc_to_choice: ["apple", "river", "stone"]
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    docs = make_corpus(3, 600, seed=5)  # text the model has not trained on, ~3,500 tokens
    text = write_jsonl(root / "text.jsonl", [{"text": d} for d in docs])
    labelled = [dict(r, gold=["apple", "river", "stone"].index(r["label"])) for r in make_labelled(30, seed=3)]
    choice = write_jsonl(root / "choice.jsonl", labelled)
    folder = root / "tasks"
    folder.mkdir()
    (folder / "tiny_text.yaml").write_text(ROLLING.format(data=text))
    (folder / "tiny_choice.yaml").write_text(CHOICE.format(data=choice))
    return {"folder": folder, "text": text, "docs": docs}


def test_harness_bits_per_byte_agree_with_ftk_perplexity_on_the_same_windows(pretrained, tasks, tmp_path):
    harness_run, ftk_run = tmp_path / "harness", tmp_path / "ftk"
    assert ftk("evaluate", f"model.name_or_path={pretrained['gpt']}", "eval=harness", "eval.tasks=tiny_text",
               f"eval.include_path={tasks['folder']}", "eval.context=64", f"hydra.run.dir={harness_run}") == 0
    results = json.loads((harness_run / "metrics.json").read_text())
    harness_bpb = results["harness"]["tasks"]["tiny_text"]["bits_per_byte"]
    assert "tiny_text: bits_per_byte" in (harness_run / "report.md").read_text()

    # ftk's own perplexity over non-overlapping windows of the same length (stride = context), in bits per byte
    assert ftk("evaluate", f"model.name_or_path={pretrained['gpt']}", f"data.path={tasks['text']}",
               "eval.context=64", "eval.stride=64", f"hydra.run.dir={ftk_run}") == 0
    causal = json.loads((ftk_run / "metrics.json").read_text())["causal"]
    text_bytes = sum(len(d.encode("utf-8")) for d in tasks["docs"])
    ftk_bpb = causal["loss"] * causal["tokens"] / math.log(2) / text_bytes
    print(f"bits per byte: harness {harness_bpb:.4f}, ftk {ftk_bpb:.4f} ({ftk_bpb / harness_bpb - 1:+.2%})")
    assert ftk_bpb == pytest.approx(harness_bpb, rel=0.01), (ftk_bpb, harness_bpb)

    # ftk's default sliding window (stride = context / 2) gives every token at least 32 tokens of history instead
    # of at least 1: a lower figure on the same tokens
    sliding = tmp_path / "sliding"
    assert ftk("evaluate", f"model.name_or_path={pretrained['gpt']}", f"data.path={tasks['text']}",
               "eval.context=64", f"hydra.run.dir={sliding}") == 0
    causal = json.loads((sliding / "metrics.json").read_text())["causal"]
    sliding_bpb = causal["loss"] * causal["tokens"] / math.log(2) / text_bytes
    print(f"bits per byte: ftk sliding (stride 32) {sliding_bpb:.4f}")
    assert sliding_bpb < ftk_bpb


def test_harness_runs_a_local_multiple_choice_task_on_base_plus_adapter(pretrained, tasks, tmp_path):
    adapter_run = tmp_path / "lora"
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", "objective=clm", "regime=lora",
               f"data.path={pretrained['corpus']}", "hardware=cpu", "hardware.precision=fp32", "train.seq_len=32",
               "train.batch_size=8", "train.max_steps=3", "train.eval_batches=2", f"hydra.run.dir={adapter_run}") == 0
    run = tmp_path / "eval"
    assert ftk("evaluate", f"model.name_or_path={pretrained['gpt']}", f"adapter_path={adapter_run / 'final'}",
               "eval=harness", "eval.tasks=[tiny_choice,tiny_text]", f"eval.include_path={tasks['folder']}",
               "eval.max_examples=12", f"hydra.run.dir={run}") == 0
    results = json.loads((run / "metrics.json").read_text())
    assert results["adapter"] == str(adapter_run / "final")
    choice = results["harness"]["tasks"]["tiny_choice"]
    assert 0.0 <= choice["acc"] <= 1.0 and "acc_stderr" in choice
    assert results["harness"]["n_samples"]["tiny_choice"]["effective"] == 12
    assert "tiny_choice: acc" in (run / "report.md").read_text()


def test_harness_refuses_unknown_tasks_and_a_missing_task_list_in_one_line(pretrained, tasks, tmp_path, capsys):
    assert ftk("evaluate", f"model.name_or_path={pretrained['gpt']}", "eval=harness",
               f"eval.include_path={tasks['folder']}", "eval.tasks=tiny_txet", f"hydra.run.dir={tmp_path / 'a'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown lm-eval task tiny_txet" in err[0] and "tiny_choice, tiny_text" in err[0], err
    assert ftk("evaluate", f"model.name_or_path={pretrained['gpt']}", "eval=harness",
               f"hydra.run.dir={tmp_path / 'b'}") == 2
    assert "eval=harness needs the tasks to run: pass eval.tasks=" in capsys.readouterr().err
