"""Preference tuning: pairs in the formats people have, truncation and what is dropped, the reference policy
(adapter off, frozen copy, precomputed and cached), logged figures, reward models on decoders and encoders,
exact resume, merge-adapter on a DPO adapter, and what the planner counts."""

from __future__ import annotations

import gzip
import json
import random
import signal
import subprocess
import sys

import pytest
import torch

from ftk.data.preferences import collate_pairs, fit, load_pairs
from ftk.data.tokenizer import train_tokenizer
from ftk.errors import UsageError
from ftk.schemas import Family
from tests.conftest import WORDS, ftk, make_corpus, write_jsonl

# A ChatML-like template (as tests/test_sft.py): END closes the assistant's turn.
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}END{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_pairs(n, seed=0):
    """Learnable preferences: the chosen response repeats the prompt's word, the rejected one does not."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        out.append({"prompt": f"Say {a} twice.", "chosen": f" {a} {a}", "rejected": f" {b} {a} {b}"})
    return out


def hh(pair):
    """The same pair as Anthropic-HH dialogues: whole conversations sharing the prompt."""
    head = f"\n\nHuman: {pair['prompt']}\n\nAssistant:"
    return {"chosen": head + pair["chosen"], "rejected": head + pair["rejected"]}


@pytest.fixture(scope="module")
def tok():
    texts = make_corpus(n_docs=40, words_per_doc=60) + [json.dumps(p) for p in make_pairs(40)]
    return train_tokenizer(texts, Family.gpt2, vocab_size=400, model_max_length=128)


def texts(tok, pair):
    return (tok.decode(pair.prompt), tok.decode(pair.chosen), tok.decode(pair.rejected))


# ------------------------------------------------------------------------------------------------ data


def test_prompt_chosen_rejected_strings_and_hh_dialogues_give_the_same_pairs(tok, tmp_path):
    records = make_pairs(6)
    plain, stats = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", records)), tok, 64)
    # HH dialogues, gzip-compressed, read as they are; a multi-turn prefix is part of the prompt
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(hh(r)) + "\n" for r in records))
    dialogues, hh_stats = load_pairs(str(path), tok, 64)
    assert stats["pairs"] == hh_stats["pairs"] == 6
    eos = tok.eos_token
    for p, q, r in zip(plain, dialogues, records):
        assert texts(tok, p) == (r["prompt"], r["chosen"] + eos, r["rejected"] + eos)
        assert texts(tok, q)[0] == f"\n\nHuman: {r['prompt']}\n\nAssistant:"
        assert texts(tok, q)[1:] == texts(tok, p)[1:]
    # a response that repeats the prompt is cut after it
    again, _ = load_pairs(str(write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": r["prompt"], "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in records])), tok, 64)
    assert [texts(tok, p) for p in again] == [texts(tok, p) for p in plain]


def test_hh_prompt_is_up_to_the_last_shared_assistant_turn(tok, tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: say the\n\nAssistant: the the"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: say the\n\nAssistant: man"
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "a.jsonl", [{"chosen": chosen, "rejected": rejected}])),
                            tok, 64)
    assert texts(tok, pair) == ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: say the\n\nAssistant:",
                                " the the" + tok.eos_token, " man" + tok.eos_token)


def test_chat_messages_use_the_template_when_there_is_one(tok, tmp_path):
    records = [{"prompt": [{"role": "user", "content": "Say the twice."}],
                "chosen": [{"role": "assistant", "content": "the the"}],
                "rejected": [{"role": "assistant", "content": "man"}]},
               {"chosen": [{"role": "user", "content": "Say man."}, {"role": "assistant", "content": "man"}],
                "rejected": [{"role": "user", "content": "Say man."}, {"role": "assistant", "content": "old"}]}]
    path = str(write_jsonl(tmp_path / "m.jsonl", records))
    plain, stats = load_pairs(path, tok, 64)  # no template: written as HH dialogues
    assert stats["template"] == "plain"
    assert texts(tok, plain[0]) == ("\n\nHuman: Say the twice.\n\nAssistant:", " the the" + tok.eos_token,
                                    " man" + tok.eos_token)
    tok.chat_template = CHAT
    try:
        chat, stats = load_pairs(path, tok, 64)
    finally:
        tok.chat_template = None
    assert stats["template"] == "chat"
    assert tok.decode(chat[0].prompt) == "<|user|>\nSay the twice.\n<|assistant|>\n"
    assert tok.decode(chat[0].chosen).startswith("the theEND")
    assert tok.decode(chat[1].prompt) == "<|user|>\nSay man.\n<|assistant|>\n"
    assert tok.decode(chat[1].rejected).startswith("oldEND")


def test_truncation_keeps_the_prompt_end_and_the_response_start():
    prompt, chosen, rejected = list(range(30)), list(range(100, 140)), list(range(200, 205))
    p, c, r, cut = fit(prompt, chosen, rejected, 48)
    assert cut and p == list(range(6, 30)) and len(p) + len(c) == 48 and c == chosen[:24] and r == rejected
    assert fit(list(range(48)), [1], [2], 48) is None  # a prompt as long as the sequence: dropped
    assert fit(prompt, [1], [2], 48) == (prompt, [1], [2], False)


def test_what_is_dropped_is_counted_and_all_dropped_is_refused(tok, tmp_path):
    good = make_pairs(4)
    long_prompt = {"prompt": " ".join(["the"] * 80), "chosen": " a", "rejected": " b"}
    records = good + [{"prompt": "p", "chosen": " same", "rejected": " same"}, long_prompt,
                      {"prompt": "q", "chosen": " ", "rejected": " x"},
                      {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "totally different"}]
    pairs, stats = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", records)), tok, 32)
    assert len(pairs) == 4
    assert (stats["dropped_identical"], stats["dropped_long_prompt"], stats["dropped_empty"],
            stats["dropped_no_shared_prompt"]) == (1, 1, 1, 1)
    for bad, expect in (([{"prompt": "p", "chosen": " s", "rejected": " s"}] * 3, "identical chosen and rejected"),
                        ([long_prompt] * 3, "longer than train.seq_len=32"),
                        ([{"prompt": "p", "chosen": "", "rejected": " x"}] * 2, "has an empty response"),
                        ([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "c"}] * 2, "share a prompt"),
                        ([{"text": "a", "label": "b"}], "has no 'chosen' column, so it holds no preference")):
        with pytest.raises(UsageError, match=expect):
            load_pairs(str(write_jsonl(tmp_path / "bad.jsonl", bad)), tok, 32)


def test_collate_puts_chosen_first_and_labels_only_responses(tok):
    from ftk.data.preferences import Pair

    batch = collate_pairs([Pair([1, 2], [3, 4, 5], [6]), Pair([7], [8], [9, 10])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 5], [-100, 8, -100, -100, -100],
                                        [-100, -100, 6, -100, -100], [-100, 9, 10, -100, -100]]
    assert "reference_logps" not in batch


# ------------------------------------------------------------------------------------------------ runs

TINY = ["hardware=cpu", "hardware.precision=fp32", "hardware.num_threads=1", "train.seq_len=32",
        "train.batch_size=8", "train.log_every=2", "train.eval_batches=2", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(root / "train.jsonl", make_pairs(64, seed=1)),
            "dev": write_jsonl(root / "dev.jsonl", make_pairs(16, seed=2))}


def _run(tmp_path, name, *args):
    run = tmp_path / name
    assert ftk("finetune", *TINY, *args, f"hydra.run.dir={run}") == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, history, json.loads((run / "summary.json").read_text())


def test_dpo_lora_learns_the_preference_and_logs_rewards(pretrained, pairs_file, tmp_path):
    run, history, summary = _run(tmp_path, "dpo", "objective=dpo", "regime=lora", "train.lr=1e-2",
                                 "train.max_steps=24", f"model.name_or_path={pretrained['gpt']}",
                                 f"data.path={pairs_file['train']}", f"data.validation_path={pairs_file['dev']}")
    first, last = history[0], history[-1]
    for key in ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
                "logps_rejected", "kl"):
        assert key in first and f"eval_{key}" in last
    assert abs(first["loss"] - 0.6931) < 0.01  # the policy starts as its reference: log 2
    assert last["eval_accuracy"] > 0.8 and last["eval_margin"] > 0 and last["loss"] < first["loss"]
    assert summary["reference"] == "adapter_off" and summary["final_eval_accuracy"] == last["eval_accuracy"]
    assert summary["data_stats"]["pairs"] == 64 and summary["validation_examples"] == 16
    # the adapter is a plain peft adapter on the base: merge-adapter folds it in
    merged = tmp_path / "merged"
    assert ftk("merge-adapter", f"adapter_path={run / 'final'}", f"output_dir={merged}") == 0
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(merged)).__name__ == "GPT2LMHeadModel"
    # ftk evaluate eval=preference on the held-out pairs: the adapter against itself switched off gives the pair
    # accuracy validation measured; the merged model against its base (eval.reference) the same
    scored = []
    for name, args in (("adapter", [f"adapter_path={run / 'final'}"]),
                       ("merged", [f"model.name_or_path={merged}", f"eval.reference={pretrained['gpt']}",
                                   "eval=preference"])):
        out = tmp_path / f"eval-{name}"
        assert ftk("evaluate", *args, f"data.path={pairs_file['dev']}", "hardware=cpu", f"hydra.run.dir={out}") == 0
        scored.append(json.loads((out / "metrics.json").read_text())["preference"])
    for p in scored:
        assert p["pairs"] == 16 and p["accuracy"] == summary["final_eval_accuracy"]
        assert 0 <= p["longer_wins"] <= 1 and 0 <= p["reference_likelihood_wins"] <= 1
        assert abs(p["margin"] - summary["final_eval_margin"]) < 1e-3


def test_full_regime_uses_a_frozen_16bit_copy_and_precomputed_is_cached_by_base(pretrained, pairs_file, tmp_path,
                                                                                 capsys):
    data = [f"data.path={pairs_file['train']}", f"data.validation_path={pairs_file['dev']}", "train.max_steps=4"]
    base = f"model.name_or_path={pretrained['gpt']}"
    _, copy_history, summary = _run(tmp_path, "copy", "objective=dpo", "regime=full", base, *data)
    assert summary["reference"] == "frozen_copy"
    assert "a frozen copy of the base in bfloat16" in capsys.readouterr().err
    _, pre_history, summary = _run(tmp_path, "pre", "objective=dpo", "regime=full", "objective.reference=precomputed",
                                   base, *data)
    assert summary["reference"] == "precomputed" and "precomputed and cached" in capsys.readouterr().err
    # the same base and data read the cache; the first step is log 2 either way (16-bit copy: up to its rounding)
    _, again, _ = _run(tmp_path, "pre2", "objective=dpo", "regime=full", "objective.reference=precomputed", base,
                       *data)
    assert "read from" in capsys.readouterr().err
    assert [r.get("loss") for r in again] == [r.get("loss") for r in pre_history]
    assert abs(pre_history[0]["loss"] - copy_history[0]["loss"]) < 5e-3
    # another base (the merged SFT-like model of another run) never reuses them
    other = tmp_path / "other-base"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained["gpt"])
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1.01)
    model.save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(pretrained["gpt"]).save_pretrained(other)
    _run(tmp_path, "pre3", "objective=dpo", "regime=full", "objective.reference=precomputed",
         f"model.name_or_path={other}", *data)
    assert "precomputed and cached" in capsys.readouterr().err


@pytest.mark.parametrize("objective,extra", [("simpo", ["objective.gamma=0.5"]), ("orpo", []),
                                             ("dpo", ["objective.loss=ipo"]),
                                             ("dpo", ["objective.label_smoothing=0.1", "regime=prompt_tuning"])])
def test_other_preference_objectives_train(objective, extra, pretrained, pairs_file, tmp_path):
    _, history, summary = _run(tmp_path, objective, f"objective={objective}", "regime=lora", *extra,
                               "train.max_steps=4", f"model.name_or_path={pretrained['gpt']}",
                               f"data.path={pairs_file['train']}")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history if "loss" in r)
    assert "final_eval_accuracy" in summary and "eval_margin" in history[-1]


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_reward_model_on_decoders_and_encoders(model, pretrained, pairs_file, tmp_path):
    run, history, summary = _run(tmp_path, f"rm-{model}", "objective=reward", "regime=full", "train.lr=3e-3",
                                 "train.max_steps=24", f"model.name_or_path={pretrained[model]}",
                                 f"data.path={pairs_file['train']}", f"data.validation_path={pairs_file['dev']}")
    assert history[-1]["eval_accuracy"] > 0.7, history[-1]
    from transformers import AutoModelForSequenceClassification

    head = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert head.config.num_labels == 1
    out = tmp_path / "eval"
    assert ftk("evaluate", f"model.name_or_path={run / 'final'}", f"data.path={pairs_file['dev']}", "hardware=cpu",
               f"hydra.run.dir={out}") == 0
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["kind"] == "preference" and scored["preference"]["kind"] == "reward model"
    assert scored["preference"]["accuracy"] == summary["final_eval_accuracy"]
    # a decoder reward model's base is a causal LM: its log-likelihood preference is the second baseline
    assert ("reference_likelihood_wins" in scored["preference"]) == (model == "gpt")


def test_margin_column_shifts_the_reward_loss(pretrained, tmp_path):
    records = [dict(r, margin=2.0) for r in make_pairs(24)]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    common = ["objective=reward", "regime=full", "train.max_steps=2", f"model.name_or_path={pretrained['gpt']}",
              f"data.path={path}"]
    _, plain, _ = _run(tmp_path, "plain", *common)
    _, margin, _ = _run(tmp_path, "margin", *common, "data.margin_column=margin")
    assert margin[0]["loss"] > plain[0]["loss"] + 1.0  # -log σ(d - 2) > -log σ(d) + ~1.4 near d = 0


def test_dpo_preempted_and_resumed_gives_the_uninterrupted_losses(pretrained, pairs_file, tmp_path):
    from tests.test_resume import losses, wait_for_step

    args = [*TINY, "objective=dpo", "regime=lora", "regime.lora_dropout=0.1", f"model.name_or_path={pretrained['gpt']}",
            f"data.path={pairs_file['train']}", "train.max_steps=12", "train.log_every=1", "train.save_every=2",
            "train.eval_every=6"]
    reference = tmp_path / "reference"
    assert ftk("finetune", *args, f"hydra.run.dir={reference}") == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ftk.cli.main", "finetune", *args, f"hydra.run.dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, proc, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert ftk("finetune", *args, "train.resume=auto", f"hydra.run.dir={run}") == 0
    assert losses(run) == losses(reference)
    metrics = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [m["margin"] for m in metrics(run)] == [m["margin"] for m in metrics(reference)]


# ------------------------------------------------------------------------------------------------ planner


def test_planner_counts_pairs_and_the_reference(pretrained):
    from transformers import AutoConfig

    from ftk.planner.costs import _components
    from ftk.planner.setup import Setup
    from ftk.planner.shapes import shape_from_config

    shape = shape_from_config(AutoConfig.from_pretrained(pretrained["gpt"]))
    sft = _components(shape, Setup(regime="full", objective="sft", seq_len=64, micro_batch_size=4))
    pre = _components(shape, Setup(regime="full", objective="dpo", seq_len=64, micro_batch_size=4, pairs=True,
                                   reference="precomputed"))
    copy = _components(shape, Setup(regime="full", objective="dpo", seq_len=64, micro_batch_size=4, pairs=True,
                                    reference="frozen_copy"))
    assert pre.weights == sft.weights and copy.weights == sft.weights + 2 * sft.parameters
    assert pre.activations > 1.9 * sft.activations  # two sequences per pair
    assert copy.logits > pre.logits


@pytest.mark.parametrize("regime", ["lora", "full"])
def test_dpo_on_two_processes_matches_one(regime, pretrained, pairs_file, tmp_path):
    """Pairs weigh the same over ranks (targets = pairs), and the reference (adapter off, frozen copy) runs on
    each rank: 2 processes x 4 pairs give the losses and figures of 1 x 8."""
    from tests.test_distributed import one_and_two_processes

    # no dropout: its draws depend on the rank, so 2 x 4 pairs would see other masks than 1 x 8
    dropout = ["regime.lora_dropout=0"] if regime == "lora" else []
    args = ["finetune", *TINY, "objective=dpo", f"regime={regime}", *dropout, f"model.name_or_path={pretrained['gpt']}",
            f"data.path={pairs_file['train']}", f"data.validation_path={pairs_file['dev']}", "train.max_steps=3",
            "train.log_every=1", "train.eval_every=3", "train.save_every=0", "train.lr=1e-3",
            "train.eval_batches=0"]  # the whole validation set (eval_batches counts micro-batches)
    one, two = one_and_two_processes(args, tmp_path)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "accuracy", "margin", "logps_chosen", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert two[-1]["eval_accuracy"] == one[-1]["eval_accuracy"]
    assert two[-1]["eval_margin"] == pytest.approx(one[-1]["eval_margin"], rel=1e-4, abs=1e-6)


def test_reward_lora_adapter_merges_and_a_head_only_reward_model_trains(pretrained, pairs_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = [f"model.name_or_path={pretrained['gpt']}", f"data.path={pairs_file['train']}", "train.max_steps=2"]
    run, _, _ = _run(tmp_path, "rm-lora", "objective=reward", "regime=lora", *data)
    merged = tmp_path / "merged"
    # merge-adapter checks the merged scores against base + adapter before writing
    assert ftk("merge-adapter", f"adapter_path={run / 'final'}", f"output_dir={merged}") == 0
    assert AutoModelForSequenceClassification.from_pretrained(merged).config.num_labels == 1
    _, history, summary = _run(tmp_path, "rm-head", "objective=reward", "regime=feature_extraction", *data)
    assert summary["trainable_parameters"] < 1000 and "eval_accuracy" in history[-1]
