"""`ftk finetune` end to end on tiny pretrained models: every regime trains exactly the weights it
should (frozen ones bit-identical), adapters load with plain peft, forgetting is measured, and the
mitigations act."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ftk, make_labelled, write_jsonl

FAST = ["hardware=cpu", "hardware.precision=fp32", "train.batch_size=8", "train.seq_len=64", "train.warmup_steps=2",
        "train.log_every=2", "train.eval_every=6", "train.save_every=0"]


@pytest.fixture
def task(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(96, seed=1))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_labelled(30, seed=2))
    return [f"data.path={train}", f"data.validation_path={dev}"]


def finetune(tmp_path, base, *args, name="run") -> Path:
    run = tmp_path / name
    code = ftk("finetune", f"model.name_or_path={base}", *FAST, *args, f"hydra.run.dir={run}")
    assert code == 0
    return run


def weights(model_dir: Path):
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def changed_and_frozen(base: Path, final: Path):
    """(changed, unchanged) body parameter names, final classifier vs the base LM checkpoint."""
    before, after = weights(base), weights(final)
    shared = [k for k in after if k in before]
    assert shared, "the classifier shares no parameter names with its base"
    changed = {k for k in shared if not torch.equal(before[k], after[k])}
    return changed, set(shared) - changed


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_full_trains_every_body_weight_and_saves_a_plain_classifier(pretrained, task, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = finetune(tmp_path, pretrained["gpt"], "regime=full", "train.max_steps=12", *task)
    changed, same = changed_and_frozen(pretrained["gpt"], run / "final")
    assert not same, f"full fine-tuning left {sorted(same)[:3]} untouched"
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.id2label == {0: "apple", 1: "river", 2: "stone"}
    AutoTokenizer.from_pretrained(run / "final")
    record = json.loads((run / "final" / "ftk_finetune.json").read_text())
    assert record["regime"] == "full" and record["base_model"] == str(pretrained["gpt"].resolve())
    s = summary(run)
    assert s["trainable_parameters"] == s["parameters"] and 0 <= s["final_eval_accuracy"] <= 1


def test_feature_extraction_changes_only_the_head(pretrained, task, tmp_path):
    run = finetune(tmp_path, pretrained["gpt"], "regime=feature_extraction", "train.max_steps=8", *task)
    changed, same = changed_and_frozen(pretrained["gpt"], run / "final")
    assert not changed, f"frozen body weights changed: {sorted(changed)[:3]}"
    s = summary(run)
    head = weights(run / "final")["score.weight"]
    assert s["trainable_parameters"] == head.numel()


def test_freeze_layers_keeps_embeddings_and_lower_blocks(pretrained, task, tmp_path):
    run = finetune(tmp_path, pretrained["gpt"], "regime=freeze_layers", "regime.freeze_layers=1",
                   "train.max_steps=8", *task)
    changed, same = changed_and_frozen(pretrained["gpt"], run / "final")
    assert same == {k for k in same | changed if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))}
    assert any(k.startswith("transformer.h.1.") for k in changed) and "transformer.ln_f.weight" in changed


def test_gradual_unfreeze_follows_its_schedule(pretrained, task, tmp_path):
    # 2 blocks, unfreeze every 4 steps: head+ln_f (steps 0-3), +block 1 (4-7), +block 0 (8-11), embeddings at 12
    run = finetune(tmp_path, pretrained["gpt"], "regime=gradual_unfreeze", "regime.unfreeze_every=4",
                   "train.max_steps=12", *task)
    changed, same = changed_and_frozen(pretrained["gpt"], run / "final")
    assert same == {k for k in same | changed if k.startswith(("transformer.wte", "transformer.wpe"))}
    assert any(k.startswith("transformer.h.0.") for k in changed)


def test_head_then_full_lowers_the_rate_when_the_body_joins(pretrained, task, tmp_path):
    run = finetune(tmp_path, pretrained["gpt"], "regime=head_then_full", "regime.head_steps=6",
                   "regime.full_lr_ratio=0.1", "train.max_steps=12", "train.schedule=constant", *task)
    changed, same = changed_and_frozen(pretrained["gpt"], run / "final")
    assert not same
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lrs[4] == pytest.approx(1e-3) and lrs[8] == pytest.approx(1e-4)


@pytest.mark.parametrize("regime,expect", [("lora", "lora_"), ("prompt_tuning", "prompt_embeddings"),
                                           ("dora", "lora_"), ("ia3", "ia3_l")])
def test_adapter_regimes_save_only_the_adapter_and_head(regime, expect, pretrained, task, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = finetune(tmp_path, pretrained["gpt"], f"regime={regime}", "train.max_steps=8", *task)
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert all(expect in k or "score" in k for k in saved), sorted(saved)[:5]
    assert any("score" in k for k in saved), "the new head must be saved with the adapter"
    if regime in ("lora", "dora"):
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # B starts at zero: it trained
    if regime == "dora":
        assert any("lora_magnitude_vector" in k for k in saved), "DoRA saves its magnitudes"
    if regime == "ia3":  # its vectors start at one
        assert any("ia3_l" in k and not torch.equal(v, torch.ones_like(v)) for k, v in saved.items())
    # plain peft loads it on its base, and gives the accuracy the run reported
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(pretrained["gpt"].resolve())
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=3)
    model = PeftModel.from_pretrained(base, final).eval()
    s = summary(run)
    assert s["trainable_share"] < 0.2
    records = [json.loads(line) for line in (tmp_path / "dev.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    labels = s["labels"]
    correct = 0
    with torch.no_grad():
        for r in records:
            ids = tok(r["text"])["input_ids"]  # the saved tokenizer appends the eos the head reads, as trained
            assert ids[-1] == tok.eos_token_id
            logits = model(input_ids=torch.tensor([ids])).logits
            correct += labels[int(logits.argmax())] == r["label"]
    # adapters that change weights: exact. A decoder's soft prompt is trained on left-padded batches, whose absolute positions shift
    # with the padding; one example at a time has none, so a few answers may differ.
    exact = regime != "prompt_tuning"
    assert correct / len(records) == pytest.approx(s["final_eval_accuracy"], abs=0 if exact else 0.1)


def test_lora_learns_the_task(pretrained, task, tmp_path):
    run = finetune(tmp_path, pretrained["gpt"], "regime=lora", "train.lr=5e-3", "train.max_steps=90",
                   "train.eval_every=30", *task)
    assert summary(run)["final_eval_accuracy"] >= 0.7  # chance is 1/3


def test_bert_classification_with_lora_and_full(pretrained, task, tmp_path):
    run = finetune(tmp_path, pretrained["bert"], "regime=full", "train.lr=1e-3", "train.max_steps=160",
                   "train.eval_every=40", *task,
                   name="full")
    assert summary(run)["final_eval_accuracy"] >= 0.8
    run = finetune(tmp_path, pretrained["bert"], "regime=lora", "train.max_steps=6", *task, name="lora")
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("pooler" in k for k in saved) and any("classifier" in k for k in saved)


def test_forgetting_is_measured_and_zero_when_the_body_is_frozen(pretrained, task, tmp_path):
    general = f"forgetting.data_path={pretrained['corpus']}"
    frozen = finetune(tmp_path, pretrained["gpt"], "regime=feature_extraction", "train.max_steps=4", general,
                      "forgetting.max_blocks=8", *task, name="frozen")
    f = summary(frozen)["forgetting"]
    assert f["base_ppl"] > 1 and f["finetuned_ppl"] == pytest.approx(f["base_ppl"], rel=1e-6)
    full = finetune(tmp_path, pretrained["gpt"], "regime=full", "train.lr=3e-3", "train.max_steps=20", general,
                    "forgetting.max_blocks=8", *task, name="full")
    f = summary(full)["forgetting"]
    assert f["ppl_ratio"] > 1.05, f  # a high rate on a narrow task damages the language model


def test_replay_and_l2sp_hold_off_forgetting(pretrained, task, tmp_path):
    common = ["regime=full", "train.lr=3e-3", "train.max_steps=20", f"forgetting.data_path={pretrained['corpus']}",
              "forgetting.max_blocks=8", *task]
    plain = summary(finetune(tmp_path, pretrained["gpt"], *common, name="plain"))["forgetting"]["ppl_ratio"]
    replay = summary(finetune(tmp_path, pretrained["gpt"], *common, "forgetting.replay_fraction=0.5",
                              f"forgetting.replay_path={pretrained['corpus']}", name="replay"))["forgetting"]["ppl_ratio"]
    l2sp = summary(finetune(tmp_path, pretrained["gpt"], *common, "forgetting.l2sp=10.0",
                            name="l2sp"))["forgetting"]["ppl_ratio"]
    assert replay < plain and l2sp < plain, (plain, replay, l2sp)


def test_early_stopping_keeps_the_best_model(pretrained, task, tmp_path):
    run = finetune(tmp_path, pretrained["gpt"], "regime=full", "train.lr=5e-2", "train.max_steps=40",
                   "train.eval_every=2", "train.early_stopping_patience=2", *task)
    s = summary(run)
    assert s["stopped_early"] and s["steps"] < 40 and s["best_step"] < s["steps"]
    best, final = weights(run / "best"), weights(run / "final")
    assert all(torch.equal(best[k], final[k]) for k in best)
    evals = [r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert s["final_eval_loss"] == pytest.approx(min(evals))


def test_clm_domain_adaptation_and_regime_that_does_not_fit(pretrained, tmp_path):
    run = finetune(tmp_path, pretrained["gpt"], "objective=clm", "regime=lora", f"data.path={pretrained['corpus']}",
                   "train.max_steps=6")
    assert "final_eval_ppl" in summary(run)
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", "objective=clm", "regime=feature_extraction",
               *FAST, f"hydra.run.dir={tmp_path / 'bad'}") == 2


def test_newcomer_default_uses_the_newest_pretrain_run_and_the_embedded_task(pretrained, tmp_path, monkeypatch,
                                                                             capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    assert ftk("finetune", "regime=lora", "train.max_steps=2", *FAST) == 2
    assert "no finished `ftk pretrain` run" in capsys.readouterr().err
    run = tmp_path / "runs" / "pretrain" / "2026-01-01_00-00-00"
    shutil.copytree(pretrained["gpt"].parent, run)
    assert ftk("finetune", "regime=lora", "train.max_steps=4", *FAST) == 0
    err = capsys.readouterr().err
    assert f"base model: {(run / 'final').resolve()} (the newest pretrain run)" in err
    assert "embedded task" in err
    (finished,) = [run for run in (tmp_path / "runs" / "finetune").iterdir() if (run / "summary.json").exists()]
    assert summary(finished)["labels"] == ["asyncio", "email", "http", "logging", "unittest", "xml"]


def test_regime_sweep_writes_one_comparison_table(pretrained, task, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert ftk("finetune", "-m", f"model.name_or_path={pretrained['gpt']}", *FAST, "train.max_steps=4", *task,
               "regime=full,feature_extraction,lora,prompt_tuning", f"hydra.sweep.dir={sweep}",
               f"forgetting.data_path={pretrained['corpus']}", "forgetting.max_blocks=4") == 0
    table = (sweep / "comparison.md").read_text()
    for regime in ("full", "feature_extraction", "lora", "prompt_tuning"):
        assert f"| {regime} |" in table
    assert table.count("accuracy") == 4 and table.count("ppl ") == 4


@pytest.mark.parametrize("args,message", [
    (["model.name_or_path={tmp}"], "is not a model directory"),
    (["data.label_column=category"], "has no column 'category'"),
    (["data.validation_path={unseen}"], "that the training data never has"),
    (["objective=clm", "regime=head_then_full"], "trains a new task head"),
    (["objective=sft", "data.path=null"], "objective=sft needs instruction data"),
    (["regime=lora", "forgetting.l2sp=1.0"], "forgetting.l2sp has no effect"),
    (["data.train_examples=5000"], "is more than the 96 training records"),
    (["data.test_path={unseen}"], "that the training data never has"),
    (["model.random_init=true", "forgetting.data_path={unseen}"], "no pretrained knowledge to forget"),
    (["objective=sft", "data.train_examples=10"], "applies to objective=classification only"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, pretrained, task, tmp_path, capsys):
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "a b c", "label": "banana"}])
    args = [a.format(tmp=tmp_path, unseen=unseen) for a in args]
    base = [f"model.name_or_path={pretrained['gpt']}"] if not any(a.startswith("model.") for a in args) else []
    given = {a.split("=", 1)[0] for a in args}
    task = [a for a in task if a.split("=", 1)[0] not in given]
    assert ftk("finetune", *base, *FAST, *task, *args, f"hydra.run.dir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftk finetune:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_qlora_trains_evaluates_and_trains_again_through_the_loop(pretrained, task, tmp_path):
    pytest.importorskip("bitsandbytes")
    # eval at step 3 between training steps: on AVX512-BF16 CPUs an eval forward used to repack the 4-bit
    # weights and break the next training step (see ftk/regimes/qlora_base.py)
    run = finetune(tmp_path, pretrained["gpt"], "regime=qlora", "hardware.precision=bf16", "train.max_steps=6",
                   "train.eval_every=3", *task)
    s = summary(run)
    assert s["steps"] == 6 and s["adapter"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [3, 6]
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    assert json.loads((run / "final" / "ftk_finetune.json").read_text())["quantized_base"] is True


def test_sft_trains_on_responses_and_saves_a_causal_lm(pretrained, tmp_path):
    from transformers import AutoModelForCausalLM

    records = [{"instruction": f"Name the keyword of: {r['text']}", "input": "", "output": r["label"]}
               for r in make_labelled(40, seed=3)]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    run = finetune(tmp_path, pretrained["gpt"], "objective=sft", "regime=full", "train.lr=3e-3",
                   "train.max_steps=30", "train.eval_every=2", f"data.path={data}", "data.validation_fraction=0.2")
    evals = [r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert evals[-1] < 0.5 * evals[0], evals
    AutoModelForCausalLM.from_pretrained(run / "final")


def test_sft_says_how_many_records_it_dropped(pretrained, tmp_path, capsys):
    records = [{"instruction": f"Repeat: {r['label']}", "input": "", "output": r["label"]}
               for r in make_labelled(20, seed=3)]
    records.append({"instruction": "too long " * 80, "input": "", "output": "x"})  # > train.seq_len=64 tokens
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    finetune(tmp_path, pretrained["gpt"], "objective=sft", "regime=lora", "train.max_steps=1", f"data.path={data}")
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data:")]  # on stderr
    assert len(said) == 1 and said[0].endswith("examples (1 dropped: prompt longer than train.seq_len)"), said


def test_roberta_seq_len_counts_its_two_reserved_positions(pretrained, tmp_path, capsys):
    """RoBERTa's 514 positions hold 512 tokens (two are reserved for its padding offset): a tiny RoBERTa with 18
    holds 16, and seq_len 17 is refused before training, as in pretraining."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    from tests.conftest import ftk

    base = tmp_path / "roberta"
    tok = AutoTokenizer.from_pretrained(pretrained["bert"])
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=18,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(20, seed=1))
    assert ftk("finetune", f"model.name_or_path={base}", *FAST, "train.seq_len=17", f"data.path={train}",
               f"hydra.run.dir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err
    assert "train.seq_len=17 is larger than the model's 16 positions" in err, err


@pytest.mark.parametrize("objective", ["clm", "sft"])
def test_prompt_tuning_language_objectives_score_the_text_not_the_soft_prompt(objective, pretrained, tmp_path):
    # peft prepends the virtual tokens: the logits are longer than the input, and only the text's are scored
    if objective == "clm":
        data = f"data.path={pretrained['corpus']}"
    else:
        records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("apple", "river", "stone") * 20]
        data = f"data.path={write_jsonl(tmp_path / 'sft.jsonl', records)}"
    run = finetune(tmp_path, pretrained["gpt"], f"objective={objective}", "regime=prompt_tuning", data,
                   "train.max_steps=4", "train.lr=3e-2")
    s = summary(run)
    assert s["steps"] == 4 and s["trainable_parameters"] == 20 * 64  # the soft prompt only (gpt-tiny test width 64)
    assert "final_eval_ppl" in s or "final_eval_loss" in s
