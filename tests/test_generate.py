"""`ftk generate`: batched, left-padded generation gives what plain transformers gives one prompt at a time;
sampling is seeded; prompts come from text, .txt and .jsonl (instructions laid out as SFT trained them);
an adapter generates as its merged model does; scores come from a classifier."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ftk, isolated_environment, make_labelled, write_jsonl

PROMPTS = ["the old man", "when the river came , the stone said that the", "it is"]
FAST = ["hardware=cpu", "hardware.precision=fp32", "train.batch_size=8", "train.seq_len=64", "train.max_steps=4",
        "train.save_every=0", "hardware.num_threads=1"]


def samples(run):
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def plain_greedy(model_dir, prompt, new_tokens, adapter=None):
    """Greedy continuation by plain transformers (and peft), one prompt, no padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_batched_greedy_equals_plain_transformers_one_prompt_at_a_time(pretrained, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])
    run = tmp_path / "gen"
    assert ftk("generate", f"model.name_or_path={pretrained['gpt']}", f"prompts={prompts}", "hardware=cpu",
               "sampling.do_sample=false", "sampling.max_new_tokens=12", "batch_size=3", f"hydra.run.dir={run}") == 0
    got = samples(run)
    assert [r["prompt"] for r in got] == PROMPTS and [r["id"] for r in got] == [0, 1, 2]  # order and fields kept
    for record in got:
        assert record["completion"] == plain_greedy(pretrained["gpt"], record["prompt"], 12)
        assert record["stopped"] in ("eos", "length") and 0 < record["new_tokens"] <= 12
    settings = json.loads((run / "settings.json").read_text())
    assert settings["sampling"]["do_sample"] is False and settings["prompt_format"] == "raw"
    assert PROMPTS[1] + got[1]["completion"] in capsys.readouterr().out  # the samples on the terminal


def test_sampling_is_seeded(pretrained, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        runs[name] = tmp_path / name
        assert ftk("generate", f"model.name_or_path={pretrained['gpt']}", "prompts=the old man, then",
                   "hardware=cpu", "sampling.samples_per_prompt=3", "sampling.max_new_tokens=10", "sampling.top_k=50",
                   "sampling.temperature=1.5", f"sampling.seed={seed}", f"hydra.run.dir={runs[name]}") == 0
    a, b, c = ([r["completion"] for r in samples(runs[n])] for n in "abc")
    assert samples(runs["a"])[0]["prompt"] == "the old man, then"  # the comma is text, not a sweep
    assert a == b and len(a) == 3 and len(set(a)) > 1 and a != c


def test_prompts_from_a_text_file_and_instructions_as_sft_lays_them_out(pretrained, tmp_path):
    from transformers import AutoTokenizer

    from ftk.data.instructions import prompt_for
    from ftk.generation import prompts as prompt_files

    (tmp_path / "p.txt").write_text("the old man\n\n  \nit is\n")
    assert [p.text for p in prompt_files.read(str(tmp_path / "p.txt"))] == ["the old man", "it is"]
    records = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Name a river.", "input": "the stone"}])
    read = prompt_files.read(str(records))
    tok = AutoTokenizer.from_pretrained(pretrained["gpt"])
    ids = prompt_files.token_ids(read[0], tok, instruction=False)  # an instruction record is always laid out
    assert tok.decode(ids) == prompt_for(tok, "Name a river.", "the stone")
    run = tmp_path / "gen"
    assert ftk("generate", f"model.name_or_path={pretrained['gpt']}", f"prompts={records}", "hardware=cpu",
               "sampling.max_new_tokens=4", f"hydra.run.dir={run}") == 0
    assert samples(run)[0]["input"] == "the stone"


def test_encoder_is_refused_in_one_line(pretrained, tmp_path, capsys):
    assert ftk("generate", f"model.name_or_path={pretrained['bert']}", "prompts=the old man", "hardware=cpu",
               f"hydra.run.dir={tmp_path / 'gen'}") == 2
    assert "is a masked language model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapters(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-adapters")
    train = write_jsonl(root / "train.jsonl", make_labelled(48, seed=1))
    dev = write_jsonl(root / "dev.jsonl", make_labelled(12, seed=2))
    base = f"model.name_or_path={pretrained['gpt']}"
    with isolated_environment(tmp_path_factory):
        assert ftk("finetune", base, *FAST, "regime=lora", "objective=clm", f"data.path={pretrained['corpus']}",
                   f"hydra.run.dir={root / 'clm'}") == 0
        assert ftk("finetune", base, *FAST, "regime=lora", f"data.path={train}", f"data.validation_path={dev}",
                   f"hydra.run.dir={root / 'cls'}") == 0
    return {"clm": root / "clm" / "final", "cls": root / "cls" / "final"}


def test_an_adapter_generates_as_plain_peft_and_as_its_merged_model(pretrained, adapters, tmp_path):
    merged = tmp_path / "merged"
    assert ftk("merge-adapter", f"adapter_path={adapters['clm']}", f"output_dir={merged}") == 0
    out = {}
    for name, model in (("adapter", [f"adapter_path={adapters['clm']}"]), ("merged", [f"model.name_or_path={merged}"])):
        assert ftk("generate", *model, f"prompts=[{PROMPTS[0]},{PROMPTS[2]}]", "hardware=cpu",
                   "sampling.do_sample=false", "sampling.max_new_tokens=10", f"hydra.run.dir={tmp_path / ('gen-' + name)}") == 0
        out[name] = [r["completion"] for r in samples(tmp_path / ("gen-" + name))]
    assert out["adapter"] == out["merged"]
    assert out["adapter"][0] == plain_greedy(pretrained["gpt"], PROMPTS[0], 10, adapter=adapters["clm"])


def test_samples_scored_by_a_classifier_as_it_scores_them_directly(pretrained, adapters, tmp_path):
    from ftk.evaluation import loading

    run = tmp_path / "gen"
    assert ftk("generate", f"model.name_or_path={pretrained['gpt']}", f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]",
               "hardware=cpu", "sampling.max_new_tokens=6", f"score_with={adapters['cls']}", "score_label=river",
               f"hydra.run.dir={run}") == 0
    got = samples(run)
    model, tok = loading.classifier(loading.resolve_path(str(adapters["cls"])), _Cfg())
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for record in got:
        enc = tok(record["prompt"] + record["completion"], return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits.float()[0], -1)
        assert record["score"] == pytest.approx(float(probs[labels.index("river")]), abs=1e-5)
        assert set(record["label_probs"]) == set(labels)
    assert json.loads((run / "settings.json").read_text())["score"] == ["P(river)"]


def test_several_scorers_and_the_kl_from_a_reference(pretrained, adapters, tmp_path):
    """`scores` holds every scorer's score in order; `logprob` is the sample's log-probability under the model
    (teacher-forced, as plain transformers computes it), `ref_logprob` under kl_reference, and the KL estimate
    their mean difference: zero against the model itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = [f"model.name_or_path={pretrained['gpt']}", f"prompts=[{PROMPTS[0]},{PROMPTS[2]}]", "hardware=cpu",
              "sampling.max_new_tokens=6", "sampling.samples_per_prompt=2"]
    run = tmp_path / "self"
    assert ftk("generate", *common, f"score_with=[{adapters['cls']},{adapters['cls']}]",
               f"kl_reference={pretrained['gpt']}", f"hydra.run.dir={run}") == 0
    got = samples(run)
    assert all(r["scores"] == [r["score"], r["score"]] for r in got)
    assert all(r["logprob"] == r["ref_logprob"] < 0 for r in got)
    assert json.loads((run / "settings.json").read_text())["kl_estimate"] == 0

    tok = AutoTokenizer.from_pretrained(pretrained["gpt"])
    model = AutoModelForCausalLM.from_pretrained(pretrained["gpt"]).eval()
    first = got[0]
    prompt = tok(first["prompt"])["input_ids"]
    completion = tok(first["completion"], add_special_tokens=False)["input_ids"]
    completion += [tok.eos_token_id] if first["stopped"] == "eos" else []
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    expected = sum(float(logps[len(prompt) - 1 + i, t]) for i, t in enumerate(completion))
    assert first["logprob"] == pytest.approx(expected, abs=1e-3)

    other = tmp_path / "other"
    assert ftk("generate", *common, f"kl_reference={adapters['clm']}", f"hydra.run.dir={other}") == 0
    assert json.loads((other / "settings.json").read_text())["kl_estimate"] != 0
    assert ftk("generate", *common, "sampling.top_k=5", f"kl_reference={adapters['clm']}",
               f"hydra.run.dir={tmp_path / 'biased'}") == 2


class _Cfg:
    class model:
        tokenizer = None
        trust_remote_code = False
