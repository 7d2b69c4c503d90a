"""`ftk evaluate` on tiny models: batch-size-independent perplexity, masked-LM figures, classification
metrics from a head or base + adapter, in-context learning, forgetting against a second model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ftk, make_labelled, write_jsonl

CPU = ["hardware=cpu", "hardware.precision=fp32"]


def evaluate(tmp_path, *args, name="eval") -> dict:
    run = tmp_path / name
    assert ftk("evaluate", *CPU, *args, f"hydra.run.dir={run}") == 0
    assert (run / "report.md").is_file()
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture
def text_file(pretrained, tmp_path) -> Path:
    docs = sorted(pretrained["corpus"].iterdir())[:6]
    path = tmp_path / "general.txt"
    path.write_text("\n".join(p.read_text() for p in docs))
    return path


def test_perplexity_is_the_same_at_batch_sizes_1_and_8(pretrained, text_file, tmp_path):
    one = evaluate(tmp_path, f"model.name_or_path={pretrained['gpt']}", f"data.path={text_file}",
                   "eval.context=32", "eval.stride=8", "eval.batch_size=1", name="b1")["causal"]
    eight = evaluate(tmp_path, f"model.name_or_path={pretrained['gpt']}", f"data.path={text_file}",
                     "eval.context=32", "eval.stride=8", "eval.batch_size=8", name="b8")["causal"]
    assert one["tokens"] == eight["tokens"] and one["windows"] > 8
    assert eight["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4)


def test_sliding_window_scores_every_token_once_and_matches_a_hand_computation(pretrained):
    from transformers import AutoModelForCausalLM

    from ftk.evaluation.perplexity import causal_perplexity, windows

    for n, context, stride in ((100, 32, 8), (100, 32, 32), (7, 32, 16)):
        scored = [p for b, e, first in windows(n, context, stride) for p in range(first, e)]
        assert scored == list(range(1, n))  # stride = context too: windows then share one token of history
    model = AutoModelForCausalLM.from_pretrained(pretrained["gpt"]).eval()
    ids = np.random.default_rng(0).integers(0, 500, size=50)
    got = causal_perplexity(model, ids, context=50, stride=25, batch_size=4, device="cpu")
    with torch.no_grad():  # one window covers everything: the plain next-token loss
        logits = model(input_ids=torch.tensor(ids)[None]).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]))
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_masked_lm_accuracy_is_seeded_and_pseudo_perplexity_is_optional(pretrained, text_file, tmp_path):
    args = [f"model.name_or_path={pretrained['bert']}", f"data.path={text_file}", "eval.context=32"]
    a = evaluate(tmp_path, *args, "eval.batch_size=1", "eval.pseudo_perplexity=true", "eval.max_tokens=128",
                 name="a")["masked"]
    b = evaluate(tmp_path, *args, "eval.batch_size=8", "eval.max_tokens=128", name="b")["masked"]
    assert a["masked_tokens"] == b["masked_tokens"] > 0
    assert a["masked_accuracy"] == pytest.approx(b["masked_accuracy"]) and a["masked_loss"] == pytest.approx(b["masked_loss"], rel=1e-5)
    assert a["pseudo_perplexity"] > 1 and "pseudo_perplexity" not in b


@pytest.mark.parametrize("regime, steps", [("lora", 30), ("dora", 6), ("ia3", 6)])
def test_classification_metrics_from_a_base_plus_adapter(regime, steps, pretrained, tmp_path):
    """Every adapter regime's final/ evaluates to the accuracy its run reported (DoRA's magnitude vectors and
    IA3's scaling vectors must load back with the adapter, and the head with them)."""
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(96, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", make_labelled(30, seed=2))
    ft = tmp_path / "ft"
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", *CPU, f"regime={regime}", "train.lr=5e-3",
               f"train.max_steps={steps}", "train.batch_size=8", "train.seq_len=64", "train.eval_every=0",
               "train.save_every=0", f"data.path={train}", f"data.validation_path={test}",
               f"hydra.run.dir={ft}") == 0
    reported = json.loads((ft / "summary.json").read_text())["final_eval_accuracy"]
    c = evaluate(tmp_path, f"model.name_or_path={pretrained['gpt']}", f"adapter_path={ft / 'final'}",
                 f"data.path={test}", "eval=classification")["classification"]
    assert c["accuracy"] == pytest.approx(reported)  # the same examples, the same model, the same answer
    assert c["examples"] == 30 and sum(map(sum, c["confusion"])) == 30
    assert set(c["per_class"]) == {"apple", "river", "stone"}
    f1 = [v["f1"] for v in c["per_class"].values()]
    assert c["macro_f1"] == pytest.approx(sum(f1) / 3)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Confusion matrix" in report


def test_in_context_learning_table_and_plot(pretrained, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(30, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", make_labelled(12, seed=2))
    r = evaluate(tmp_path, f"model.name_or_path={pretrained['gpt']}", "eval=icl", "eval.shots=0,1,4",
                 "eval.num_test=12", f"data.path={train}", f"data.validation_path={test}")["icl"]
    assert [row["shots"] for row in r["rows"]] == [0, 1, 4]
    assert all(row["test_examples"] == 12 for row in r["rows"])
    assert r["rows"][0]["mean_shots_used"] == 0 and r["rows"][2]["mean_shots_used"] > 1
    assert (tmp_path / "eval" / "icl.png").is_file()
    again = evaluate(tmp_path, f"model.name_or_path={pretrained['gpt']}", "eval=icl", "eval.shots=0,1,4",
                     "eval.num_test=12", f"data.path={train}", f"data.validation_path={test}", name="again")["icl"]
    assert again["rows"] == r["rows"]  # seeded


def test_compare_to_reports_forgetting(pretrained, text_file, tmp_path):
    ft = tmp_path / "ft"
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", *CPU, "objective=clm", "regime=full",
               "train.lr=1e-2", "train.max_steps=10", "train.batch_size=8", "train.seq_len=64",
               f"data.path={write_jsonl(tmp_path / 'narrow.jsonl', [{'text': 'zebra ' * 200}] * 30)}",
               "train.save_every=0", f"hydra.run.dir={ft}") == 0
    r = evaluate(tmp_path, f"model.name_or_path={ft / 'final'}", f"compare_to={pretrained['gpt']}",
                 f"data.path={text_file}", "eval.context=64")
    assert r["compare"]["ratio"] > 1.1 and r["compare"]["this_ppl"] == pytest.approx(r["causal"]["perplexity"])


def test_compare_to_a_model_with_another_tokenizer_gives_bits_per_byte_not_a_perplexity_ratio(pretrained, text_file,
                                                                                             tmp_path, capsys):
    import math

    from tests.conftest import TINY_GPT

    other = tmp_path / "other"  # the same architecture, a tokenizer of another vocabulary
    assert ftk("pretrain", *TINY_GPT, "model.vocab_size=400", f"data.path={pretrained['corpus']}",
               "train.max_steps=5", "hardware.num_threads=1", f"hydra.run.dir={other}") == 0
    capsys.readouterr()
    args = [f"model.name_or_path={pretrained['gpt']}", f"compare_to={other / 'final'}", f"data.path={text_file}",
            "eval.context=64"]
    r = evaluate(tmp_path, *args)
    c = r["compare"]
    assert c["same_tokenizer"] is False and c["ratio"] is None and c["change"] is None
    from ftk.data import sources

    docs = sources.text_column(sources.load_records(str(text_file)), "text", str(text_file))
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert abs(text_bytes - len(text_file.read_bytes())) <= 2
    mine = r["causal"]
    assert c["this_bpb"] == pytest.approx(mine["loss"] * mine["tokens"] / math.log(2) / text_bytes)
    assert 0 < c["reference_bpb"] and c["bpb_ratio"] == pytest.approx(c["this_bpb"] / c["reference_bpb"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "not comparable: other tokenizer" in report and "| bits per byte: compare_to -> this |" in report
    capsys.readouterr()
    assert ftk("evaluate", *CPU, *args, "eval.max_tokens=500", f"hydra.run.dir={tmp_path / 'capped'}") == 2
    err = capsys.readouterr().err
    assert "has another tokenizer: perplexities are not comparable" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["adapter_path={gpt}"], "is not a PEFT adapter"),
    (["model.name_or_path={tmp}/nothing"], "does not exist"),
    (["eval=icl"], "eval=icl needs labelled examples"),
    (["eval.context=100000", "data.path={corpus}"], "larger than the model's"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, pretrained, tmp_path, capsys):
    args = [a.format(gpt=pretrained["gpt"], tmp=tmp_path, corpus=pretrained["corpus"]) for a in args]
    base = [] if any(a.startswith("model.") for a in args) else [f"model.name_or_path={pretrained['gpt']}"]
    assert ftk("evaluate", *CPU, *base, *args, f"hydra.run.dir={tmp_path / 'e'}") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftk evaluate:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_full_classifier_is_evaluated_as_a_classifier_and_through_its_language_view(pretrained, text_file,
                                                                                  tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(60, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", make_labelled(15, seed=2))
    ft = tmp_path / "ft"
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", *CPU, "regime=feature_extraction",
               "train.max_steps=4", "train.batch_size=8", "train.seq_len=64", "train.save_every=0",
               f"data.path={train}", f"data.validation_path={test}", f"hydra.run.dir={ft}") == 0
    c = evaluate(tmp_path, f"model.name_or_path={ft / 'final'}", f"data.path={test}", name="cls")
    assert c["kind"] == "classification"  # auto: the model has a classification head
    assert c["classification"]["accuracy"] == pytest.approx(
        json.loads((ft / "summary.json").read_text())["final_eval_accuracy"])
    # its body is frozen, so read through the base's LM head it is exactly the base language model
    view = evaluate(tmp_path, f"model.name_or_path={ft / 'final'}", "eval=perplexity", f"data.path={text_file}",
                    "eval.context=64", name="view")["causal"]["perplexity"]
    base = evaluate(tmp_path, f"model.name_or_path={pretrained['gpt']}", "eval=perplexity", f"data.path={text_file}",
                    "eval.context=64", name="base")["causal"]["perplexity"]
    assert view == pytest.approx(base, rel=1e-6)
