"""Instruction tuning: prompt masking, chat templates, truncation, data errors, and the SFT loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftk.data.examples import collate
from ftk.data.instructions import load_instruction_examples, prompt_for, prompt_ids, template_mode
from ftk.data.tokenizer import train_tokenizer
from ftk.errors import UsageError
from ftk.objectives.sft import SupervisedFineTuning
from ftk.schemas import Family
from tests.conftest import make_corpus

RECORDS = [
    {"instruction": "Reverse the words.", "input": "the old man", "output": "man old the"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sea."},
    {"instruction": "Count to three.", "output": "one two three"},
    {"instruction": "Repeat the input.", "input": "work and life", "output": "work and life"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, good people!"},
    {"instruction": "What is the first word?", "input": "time out of mind", "output": "time"},
    {"instruction": "Give a long answer.", "input": "", "output": "It was the year the state made good on it ."},
    {"instruction": "Answer yes or no: is the sea wet?", "input": "", "output": "yes"},
]

# A ChatML-like template; END is what closes the assistant's turn. (Jinja drops a newline right after
# a block tag, as transformers renders with trim_blocks, hence {{ '\\n' }}.)
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}END{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    texts = make_corpus(n_docs=40, words_per_doc=60) + [json.dumps(r) for r in RECORDS] * 3
    return train_tokenizer(texts, Family.gpt2, vocab_size=400, model_max_length=128)


def write_jsonl(path, records, blank_after=()):
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r))
        if i in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "instructions.jsonl", RECORDS)


def check_example(tok, example, record, eos_text):
    """Prompt masked, response + EOS labelled, prompt tokens exactly as for generation."""
    prompt = prompt_ids(tok, record["instruction"], record.get("input"))
    n = len(prompt)
    assert example.input_ids[:n] == prompt
    assert example.token_labels[:n] == [-100] * n
    assert example.token_labels[n:] == example.input_ids[n:]
    assert -100 not in example.token_labels[n:]
    assert example.token_labels[-1] == tok.eos_token_id
    assert tok.decode(example.token_labels[n:]) == record["output"] + eos_text


def test_masking_plain_template(tok, data):
    examples, stats = load_instruction_examples(str(data), tok, 128)
    assert stats["template"] == "alpaca" and stats["records"] == stats["examples"] == len(RECORDS)
    assert stats["truncated"] == stats["dropped_long_prompt"] == 0
    assert stats["response_tokens"] == sum(sum(t != -100 for t in e.token_labels) for e in examples)
    for example, record in zip(examples, RECORDS):
        check_example(tok, example, record, "<|endoftext|>")
    # The input block only when there is an input; the prompt ends where the response starts.
    assert prompt_for(tok, "Do it.", "x") == "### Instruction:\nDo it.\n\n### Input:\nx\n\n### Response:\n"
    assert prompt_for(tok, "Do it.", "") == prompt_for(tok, "Do it.") == "### Instruction:\nDo it.\n\n### Response:\n"
    assert tok.decode(examples[2].input_ids) == prompt_for(tok, "Count to three.") + "one two three<|endoftext|>"


def test_response_column_fallback_and_csv(tok, tmp_path):
    renamed = [{"instruction": r["instruction"], "response": r["output"]} for r in RECORDS[:3]]
    examples, stats = load_instruction_examples(str(write_jsonl(tmp_path / "r.jsonl", renamed)), tok, 128)
    assert stats["response_column"] == "response" and len(examples) == 3
    csv = tmp_path / "r.csv"
    csv.write_text("instruction,input,output\nSay hello.,,Hello there\nCount.,1 2,3\n")
    examples, _ = load_instruction_examples(str(csv), tok, 128)
    check_example(tok, examples[0], {"instruction": "Say hello.", "output": "Hello there"}, "<|endoftext|>")
    check_example(tok, examples[1], {"instruction": "Count.", "input": "1 2", "output": "3"}, "<|endoftext|>")


@pytest.mark.parametrize("end", ["{{ eos_token }}", ""])
def test_chat_template(tok, data, monkeypatch, end):
    monkeypatch.setattr(tok, "chat_template", CHAT.replace("END", end), raising=False)
    assert template_mode(tok) == "chat"
    assert prompt_for(tok, "Do it.", "x") == "<|user|>\nDo it.\n\nx\n<|assistant|>\n"
    examples, stats = load_instruction_examples(str(data), tok, 128)
    assert stats["template"] == "chat" and stats["examples"] == len(RECORDS) and stats["boundary_fallbacks"] == 0
    for example, record in zip(examples, RECORDS):
        # With EOS in the template the turn stops there (the "\n" after it is not trained);
        # without it, EOS is appended after the template's "\n".
        check_example(tok, example, {**record, "output": record["output"] + ("" if end else "\n")},
                      "<|endoftext|>")
        n = len(prompt_ids(tok, record["instruction"], record.get("input")))
        assert tok.decode(example.input_ids[:n]).startswith("<|user|>\n" + record["instruction"])


def test_chat_template_that_does_not_extend_its_prompt_falls_back(tok, data, monkeypatch):
    odd = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}ASSISTANT>{% endif %}")
    monkeypatch.setattr(tok, "chat_template", odd, raising=False)
    assert template_mode(tok) == "alpaca"
    examples, stats = load_instruction_examples(str(data), tok, 128)
    assert stats["template"] == "alpaca"
    check_example(tok, examples[0], RECORDS[0], "<|endoftext|>")


def test_truncation(tok, data):
    full, _ = load_instruction_examples(str(data), tok, 128)
    long = 6  # "Give a long answer."
    n_prompt = len(prompt_ids(tok, RECORDS[long]["instruction"]))
    n_response = len(full[long].input_ids) - n_prompt
    assert n_response > 4
    max_len = n_prompt + n_response - 3
    examples, stats = load_instruction_examples(str(data), tok, max_len)
    assert all(len(e.input_ids) <= max_len for e in examples)
    kept = {tuple(e.input_ids[:n_prompt]): e for e in examples}
    cut = kept[tuple(full[long].input_ids[:n_prompt])]
    assert cut.input_ids == full[long].input_ids[:max_len]          # prompt start and response start kept
    assert cut.token_labels == full[long].token_labels[:max_len]
    assert cut.token_labels[-1] != tok.eos_token_id
    assert stats["truncated"] >= 1
    assert stats["examples"] + stats["dropped_long_prompt"] == len(RECORDS)
    for e in examples:  # the untruncated ones still end with EOS
        if len(e.input_ids) < max_len:
            assert e.token_labels[-1] == tok.eos_token_id
    # A prompt of exactly max_len - 1 tokens keeps one label; one token more drops the record.
    shortest = min(len(prompt_ids(tok, r["instruction"], r.get("input"))) for r in RECORDS)
    examples, stats = load_instruction_examples(str(data), tok, shortest + 1)
    assert all(sum(t != -100 for t in e.token_labels) == 1 for e in examples) and examples
    assert stats["dropped_long_prompt"] == len(RECORDS) - len(examples)
    with pytest.raises(UsageError, match=r"every prompt in .* takes more than max_len-1="):
        load_instruction_examples(str(data), tok, shortest)


def test_record_errors(tok, tmp_path):
    bad = [*RECORDS[:2], {"instruction": "Empty.", "output": "  "}]
    path = write_jsonl(tmp_path / "empty.jsonl", bad, blank_after=(0,))  # a blank line: record 3 is on line 4
    with pytest.raises(UsageError, match=r"empty\.jsonl:4: record 3 has no response \('output' is missing or "
                                         r"empty\): write the response there or remove the record"):
        load_instruction_examples(str(path), tok, 128)

    path = write_jsonl(tmp_path / "missing.jsonl", [*RECORDS[:1], {"instruction": "No answer."}])
    with pytest.raises(UsageError, match=r"missing\.jsonl:2: record 2 has no response \('output'"):
        load_instruction_examples(str(path), tok, 128)

    csv = tmp_path / "r.csv"
    csv.write_text("instruction,output\nSay hello.,Hello\nSay bye.,\n")
    with pytest.raises(UsageError, match=r"r\.csv: record 2 has no response"):
        load_instruction_examples(str(csv), tok, 128)

    path = write_jsonl(tmp_path / "noinstr.jsonl", [{"prompt": "Say hello.", "output": "Hello"}])
    with pytest.raises(UsageError, match=r"noinstr\.jsonl has no instruction column 'instruction'; its columns "
                                         r"are (prompt, output|output, prompt): pass data.instruction_column="):
        load_instruction_examples(str(path), tok, 128)

    path = write_jsonl(tmp_path / "noresp.jsonl", [{"instruction": "Say hello.", "answer": "Hello"}])
    with pytest.raises(UsageError, match=r"no response column 'output' \(or 'response'\); its columns are"):
        load_instruction_examples(str(path), tok, 128)

    empty = tmp_path / "nothing.jsonl"
    empty.write_text("\n")
    with pytest.raises(UsageError, match=r"nothing\.jsonl holds no instruction records: the dataset is empty"):
        load_instruction_examples(str(empty), tok, 128)
    header_only = tmp_path / "header.csv"
    header_only.write_text("instruction,output\n")
    with pytest.raises(UsageError, match=r"header\.csv holds no instruction records"):
        load_instruction_examples(str(header_only), tok, 128)


def test_tokenizer_without_eos(tmp_path, data):
    bert = train_tokenizer(make_corpus(n_docs=10, words_per_doc=30), Family.bert, vocab_size=200,
                           model_max_length=128)
    assert bert.eos_token_id is None
    with pytest.raises(UsageError, match=r"the tokenizer has no eos token"):
        load_instruction_examples(str(data), bert, 128)


def tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok), n_positions=128,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(config).eval()


def test_sft_loss_is_the_hand_computed_one(tok, data):
    examples, _ = load_instruction_examples(str(data), tok, 128)
    objective = SupervisedFineTuning()
    batch = objective.inputs(collate(examples[:4], tok.pad_token_id), None)
    assert len({len(e.input_ids) for e in examples[:4]}) > 1  # the batch has padding
    model = tiny_gpt2(tok)
    with torch.no_grad():
        total, count = objective.loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = sum(sum(t != -100 for t in e.token_labels[1:]) for e in examples[:4])
    assert objective.targets(batch) == int(count) == labelled
    log_probs = torch.log_softmax(logits.double(), -1)
    hand, n = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target != -100:
                hand -= float(log_probs[b, t, target])
                n += 1
    assert n == labelled and math.isclose(float(total), hand, rel_tol=1e-5)
    # The same as the examples one at a time, without padding: padding changes nothing.
    with torch.no_grad():
        alone = sum(float(objective.loss(model, collate([e], tok.pad_token_id))[0]) for e in examples[:4])
    assert math.isclose(float(total), alone, rel_tol=1e-4)


def test_sft_training_lowers_the_response_loss(tok, data):
    examples, _ = load_instruction_examples(str(data), tok, 128)
    objective = SupervisedFineTuning()
    batch = collate(examples, tok.pad_token_id)
    model = tiny_gpt2(tok).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def mean_loss():
        with torch.no_grad():
            total, count = objective.loss(model.eval(), batch)
        model.train()
        return float(total / count)

    before = mean_loss()
    for _ in range(30):
        total, count = objective.loss(model, objective.inputs(batch, None))
        optimizer.zero_grad()
        (total / count).backward()
        optimizer.step()
    after = mean_loss()
    assert before > 4.0 and after < 0.4 * before, (before, after)
