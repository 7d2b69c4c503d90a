"""`ftk merge-adapter` on adapters trained from the tiny pretrained models: the merged model is a plain
Hugging Face model (loads with peft absent) giving base+adapter's logits; QLoRA merges into a de-quantized
base; every refusal is one line, exit 2, and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ftk, isolated_environment, make_labelled, write_jsonl

FAST = ["hardware=cpu", "hardware.precision=fp32", "train.batch_size=8", "train.seq_len=64", "train.max_steps=4",
        "train.save_every=0", "hardware.num_threads=1"]
TEXTS = ["the apple of the river was good", "stone came to the world and the old man said",
         "when the river came , it is long"]


@pytest.fixture(scope="module")
def adapters(pretrained, tmp_path_factory):
    """Finetune runs (4 steps) whose final/ holds an adapter: {"cls", "clm", "qlora", "prompt"} -> run dir."""
    root = tmp_path_factory.mktemp("adapters")
    train = write_jsonl(root / "train.jsonl", make_labelled(48, seed=1))
    dev = write_jsonl(root / "dev.jsonl", make_labelled(12, seed=2))
    task = [f"data.path={train}", f"data.validation_path={dev}"]
    base = f"model.name_or_path={pretrained['gpt']}"
    with isolated_environment(tmp_path_factory):
        runs = {}
        for name, args in (("cls", ["regime=lora", *task]),
                           ("clm", ["regime=lora", "objective=clm", f"data.path={pretrained['corpus']}"]),
                           ("qlora", ["regime=qlora", *task, "hardware.precision=bf16"]),
                           ("prompt", ["regime=prompt_tuning", *task])):
            run = root / name
            assert ftk("finetune", base, *FAST, *args, f"hydra.run.dir={run}") == 0, name
            runs[name] = run
        return runs


def merge(*args: str) -> int:
    return ftk("merge-adapter", *args)


def tokens(model_dir: Path, append_eos: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [tok(t)["input_ids"] + ([tok.eos_token_id] if append_eos else []) for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def reference(final: Path, auto_class, ids, mask, **kwargs):
    """Logits of base + adapter as plain peft computes them."""
    from peft import PeftModel

    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(auto_class.from_pretrained(base, **kwargs), final).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def nothing_left_beside(out: Path) -> None:
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp dir left"


def one_line(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftk merge-adapter:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def test_lora_classifier_merges_into_a_plain_model_that_loads_without_peft(adapters, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    final, out = adapters["cls"] / "final", tmp_path / "merged"
    assert merge(f"adapter_path={final}", f"output_dir={out}") == 0
    captured = capsys.readouterr()
    assert "max |logit diff|" in captured.out and "tolerance 1e-04" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "ftk_finetune.json", "merge.json",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    nothing_left_beside(out)
    facts = json.loads((out / "merge.json").read_text())
    assert facts["merged_modules"] == 2 and facts["heads_kept"] == ["score"] and facts["dtype"] == "fp32"
    assert facts["max_abs_logit_diff"] <= facts["tolerance"] == 1e-4 and not facts["quantized_base"]

    # plain weights: no peft names; the trained head is the plain head
    weights = load_file(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "modules_to_save" in k or "base_model" in k], sorted(weights)[:5]
    head = {k: v for k, v in load_file(str(final / "adapter_model.safetensors")).items() if "score" in k}
    assert len(head) == 1 and torch.equal(next(iter(head.values())), weights["score.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and not any("peft" in k for k in config)

    ids, mask = tokens(out, append_eos=False)  # the merged model's tokenizer ends each text with eos itself
    assert all(row[m.sum() - 1] == 0 for row, m in zip(ids, mask))  # <|endoftext|>
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "apple", 1: "river", 2: "stone"}
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits
    expected = reference(final, AutoModelForSequenceClassification, ids, mask, num_labels=3,
                         pad_token_id=merged.config.pad_token_id)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)

    # ... and with peft impossible to import
    code = ("import sys, json\nsys.modules['peft'] = None\nimport torch, transformers\n"
            "m = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()\n"
            "ids, mask = (torch.tensor(x) for x in json.loads(sys.argv[2]))\n"
            "with torch.no_grad():\n    print(json.dumps(m(input_ids=ids, attention_mask=mask).logits.tolist()))\n"
            "assert 'peft' not in {n.split('.')[0] for n, mod in sys.modules.items() if mod is not None}\n")
    done = subprocess.run([sys.executable, "-c", code, str(out), json.dumps([ids.tolist(), mask.tolist()])],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), expected,
                               atol=1e-4, rtol=0)


def test_lora_clm_adapter_merges_into_a_causal_lm(adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    final, out = adapters["clm"] / "final", tmp_path / "clm"
    assert merge(f"adapter_path={final}", f"output_dir={out}") == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "GPT2LMHeadModel"
    ids, mask = tokens(out, append_eos=False)
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits
    expected = reference(final, AutoModelForCausalLM, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "merge.json").read_text())["base_model"])
    assert not torch.equal(merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


def test_qlora_adapter_merges_into_a_dequantized_full_precision_base(adapters, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    final, out = adapters["qlora"] / "final", tmp_path / "qmerged"
    assert json.loads((final / "ftk_finetune.json").read_text())["quantized_base"] is True
    assert merge(f"adapter_path={final}", f"output_dir={out}", "dtype=fp32") == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "de-quantized" in said and "quantization error" in said
    facts = json.loads((out / "merge.json").read_text())
    assert facts["quantized_base"] and facts["dequantized"] and facts["dtype"] == "fp32"
    assert facts["max_abs_logit_diff"] <= 1e-4 and "de-quantized" in facts["reference"]
    assert facts["quantization_error"] is None or facts["quantization_error"] < 0.5
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    weights = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # a plain Conv1D, not packed 4-bit
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids, mask = tokens(out, append_eos=False)
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits
    expected = reference(final, AutoModelForSequenceClassification, ids, mask, num_labels=3,
                         pad_token_id=merged.config.pad_token_id)  # base in full precision + adapter
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("regime", ["dora", "ia3"])
def test_other_peft_regimes_merge_exactly_into_a_plain_classifier(regime, pretrained, tmp_path):
    """Regimes whose peft adapters change weights merge like LoRA: plain weights, base+adapter's logits."""
    from transformers import AutoModelForSequenceClassification

    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(48, seed=1))
    run, out = tmp_path / regime, tmp_path / f"{regime}-merged"
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", *FAST, f"regime={regime}",
               f"data.path={train}", f"hydra.run.dir={run}") == 0
    assert merge(f"adapter_path={run / 'final'}", f"output_dir={out}") == 0
    weights = load_file(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "ia3" in k or "base_model" in k], sorted(weights)[:5]
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids, mask = tokens(out, append_eos=True)
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits
    expected = reference(run / "final", AutoModelForSequenceClassification, ids, mask, num_labels=3,
                         pad_token_id=merged.config.pad_token_id)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def wide_gpt(pretrained, path: Path) -> Path:
    """A GPT of another width (n_embd 32, not 64) with the same tokenizer."""
    from transformers import AutoConfig, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(pretrained["gpt"])
    config.n_embd, config.n_inner = 32, 128
    GPT2LMHeadModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pretrained["gpt"] / name, path / name)
    return path


def moved(adapters, tmp_path) -> Path:
    """The classification adapter whose base is no longer where it was trained."""
    copy = tmp_path / "moved" / "final"
    shutil.copytree(adapters["cls"] / "final", copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "ftk_finetune.json").unlink()
    return copy


@pytest.mark.parametrize("case,expected", [
    ("bert_base", "its shapes differ; the adapter needs its own base: pass model.name_or_path="),
    ("wide_base", "gpt2, hidden 32, 2 layers"),
    ("wide_base_moved", "size mismatch for"),
    ("prompt_tuning", "nothing to merge; use it as it is with `ftk evaluate model.name_or_path="),
    ("not_empty", "exists and is not empty; pass another output_dir=..., or overwrite=true"),
    ("full_model", "is already a full model"),
    ("tolerance", "> tolerance 1e-12"),
])
def test_refusals_are_one_line_and_write_nothing(case, expected, adapters, pretrained, tmp_path, capsys):
    final = adapters["cls"] / "final"
    out = tmp_path / "out"
    args = [f"adapter_path={final}"]
    if case == "bert_base":
        args.append(f"model.name_or_path={pretrained['bert']}")
    elif case == "wide_base":
        args.append(f"model.name_or_path={wide_gpt(pretrained, tmp_path / 'wide')}")
    elif case == "wide_base_moved":  # the trained-on base is gone, so only loading can tell
        args = [f"adapter_path={moved(adapters, tmp_path)}", f"model.name_or_path={wide_gpt(pretrained, tmp_path / 'wide')}"]
    elif case == "prompt_tuning":
        args = [f"adapter_path={adapters['prompt'] / 'final'}"]
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "full_model":
        args = [f"adapter_path={pretrained['gpt']}"]
    elif case == "tolerance":
        args += ["dtype=bf16", "tolerance=1e-12"]
    assert merge(*args, f"output_dir={out}") == 2
    line = one_line(capsys, expected)
    if case == "prompt_tuning":
        assert f"adapter_path={adapters['prompt'] / 'final'}" in line and "regime=lora" in line
    if case in ("bert_base", "wide_base"):
        assert str(pretrained["gpt"].resolve()) in line  # names the base the adapter needs
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
        # ... and overwrite=true replaces only an earlier merge, never a folder of other work
        assert merge(*args, f"output_dir={out}", "overwrite=true") == 2
        one_line(capsys, "holds files ftk merge-adapter did not write (no merge.json)")
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    nothing_left_beside(out)
    assert not (adapters["cls"] / "merged").exists()


def test_default_adapter_is_the_newest_finetune_run_and_output_goes_next_to_it(adapters, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.chdir(tmp_path)
    assert merge() == 2
    one_line(capsys, "no adapter given and no finetune run with an adapter under ./runs/finetune*/; pass adapter_path=")
    assert not (tmp_path / "runs").exists()  # hydra's run dir is not left behind

    run = tmp_path / "runs" / "finetune" / "2024-01-01_00-00-00"
    shutil.copytree(adapters["clm"], run)
    assert merge() == 0
    err = capsys.readouterr().err
    assert f"adapter: {run / 'final'} (the newest finetune run with an adapter)" in err
    assert f"output: {run / 'merged'}" in err
    assert json.loads((run / "merged" / "merge.json").read_text())["adapter"] == str(run / "final")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["finetune"]  # no empty runs/merge/
    assert merge() == 2  # the default output now exists
    one_line(capsys, f"output_dir={run / 'merged'} exists and is not empty")


def test_overwrite_replaces_only_what_an_earlier_merge_wrote(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge(f"adapter_path={adapters['cls'] / 'final'}", f"output_dir={out}") == 0
    (out / "NOTES.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    first = json.loads((out / "merge.json").read_text())
    assert "NOTES.md" not in first["files"] and "model.safetensors" in first["files"]
    assert merge(f"adapter_path={adapters['clm'] / 'final'}", f"output_dir={out}", "overwrite=true") == 0
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "eval" / "scores.json").read_text() == "{}"
    assert json.loads((out / "merge.json").read_text())["adapter"] == str(adapters["clm"] / "final")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    nothing_left_beside(out)


def test_a_merged_classifier_is_used_as_trained_by_ftk_evaluate_and_by_plain_transformers(adapters, pretrained,
                                                                                          tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from ftk.data.labelled import tokenize
    from ftk.evaluation import loading
    from ftk.finetune_setup import load_tokenizer

    final, out = adapters["cls"] / "final", tmp_path / "merged"
    assert merge(f"adapter_path={final}", f"output_dir={out}") == 0
    record = json.loads((final / "ftk_finetune.json").read_text())
    carried = json.loads((out / "ftk_finetune.json").read_text())
    assert carried["append_eos"] is True and carried["labels"] == record["labels"] == ["apple", "river", "stone"]
    assert carried["seq_len"] == record["seq_len"] and carried["padding_side"] == record["padding_side"]

    dev = write_jsonl(tmp_path / "dev.jsonl", make_labelled(30, seed=5))
    records = [(r["text"], r["label"]) for r in map(json.loads, dev.read_text().splitlines())]
    # The ids the model was trained on: the base's tokenizer, with ftk appending the eos.
    trained = [e.input_ids for e in tokenize(records, record["labels"], load_tokenizer(str(pretrained["gpt"]), False),
                                             record["seq_len"], True)]
    plain = AutoTokenizer.from_pretrained(out)  # what a user of merged/ without ftk gets
    assert plain([t for t, _ in records])["input_ids"] == trained
    assert plain.padding_side == record["padding_side"]

    # ftk evaluate feeds the merged model exactly what it feeds base + adapter, and scores the same.
    from ftk.evaluation.schema import EvaluateConfig

    cfg = OmegaConf.structured(EvaluateConfig)
    cfg.data.path = str(dev)
    for target in (loading.resolve_path(str(out)), loading.resolve_path(str(final))):
        _, tokenizer = loading.classifier(target, cfg)
        source, _, _ = loading.labelled_source(cfg, target, tokenizer)
        assert [e.input_ids for e in source.validation] == trained
        assert source.padding_side == record["padding_side"]
    scores = []
    for args in ([f"model.name_or_path={out}"], [f"adapter_path={final}"]):
        run = tmp_path / f"eval-{len(scores)}"
        assert ftk("evaluate", "hardware=cpu", "hardware.precision=fp32", *args, f"data.path={dev}",
                   f"hydra.run.dir={run}") == 0
        scores.append(json.loads((run / "metrics.json").read_text())["classification"])
    assert scores[0]["confusion"] == scores[1]["confusion"] and scores[0]["accuracy"] == scores[1]["accuracy"]


def test_a_base_with_other_weights_of_the_same_shape_is_refused_unless_allowed(adapters, pretrained, tmp_path,
                                                                                capsys):
    from safetensors.torch import save_file

    final = adapters["cls"] / "final"
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(pretrained["gpt"], same)  # the same weights elsewhere: the same base
    shutil.copytree(pretrained["gpt"], other)  # another "pretrain" of the same shape and vocabulary
    weights = load_file(str(other / "model.safetensors"))
    weights["transformer.h.1.mlp.c_fc.weight"] += 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})

    assert merge(f"adapter_path={final}", f"model.name_or_path={other}", f"output_dir={tmp_path / 'm1'}") == 2
    line = one_line(capsys, f"model.name_or_path={other} is not the base the adapter {final} was trained on")
    assert str(pretrained["gpt"]) in line and "allow_other_base=true" in line
    assert not (tmp_path / "m1").exists()
    assert merge(f"adapter_path={final}", f"model.name_or_path={other}", f"output_dir={tmp_path / 'm1'}",
                 "allow_other_base=true") == 0
    assert json.loads((tmp_path / "m1" / "merge.json").read_text())["base_fingerprint_matches"] is False
    assert merge(f"adapter_path={final}", f"model.name_or_path={same}", f"output_dir={tmp_path / 'm2'}") == 0
    assert json.loads((tmp_path / "m2" / "merge.json").read_text())["base_fingerprint_matches"] is True

    dev = write_jsonl(tmp_path / "dev.jsonl", make_labelled(12, seed=5))
    capsys.readouterr()
    args = ["hardware=cpu", f"adapter_path={final}", f"model.name_or_path={other}", f"data.path={dev}"]
    assert ftk("evaluate", *args, f"hydra.run.dir={tmp_path / 'e1'}") == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("ftk evaluate:")]
    assert len(lines) == 1 and "is not the base the adapter" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "e1" / "metrics.json").exists()
    assert ftk("evaluate", *args, "allow_other_base=true", f"hydra.run.dir={tmp_path / 'e2'}") == 0
