"""Training, saving, reloading and fingerprinting tokenizers."""

from __future__ import annotations

import builtins
import inspect

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ftk.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from ftk.errors import UsageError
from ftk.schemas import Family

VOCAB = 600
TRICKY = "naïve café — ✓ \ufffd  Hello,\tworld!\n  x = [1, 2]  # ünïcödé 😀 日本語 <pad> "
BYTE_LEVEL = [Family.gpt2, Family.llama, Family.roberta]


@pytest.fixture(scope="module")
def texts():
    """A few hundred KB-free docstrings of builtins: real English-ish text, available offline, fast."""
    docs = [inspect.getdoc(obj) for obj in vars(builtins).values()]
    docs += [inspect.getdoc(getattr(str, name)) for name in dir(str)]
    return [d for d in docs if d] * 3


@pytest.fixture(scope="module")
def trained(texts):
    return {family: train_tokenizer(texts, family, VOCAB, 128) for family in Family}


@pytest.mark.parametrize("family", BYTE_LEVEL)
def test_byte_level_round_trip(trained, family):
    tok = trained[family]
    for text in (TRICKY, " leading space", "trailing  ", "a , b . c 's n't", "\x00\x01\x7f", ""):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids  # every byte has a token


@pytest.mark.parametrize("family", list(Family))
def test_vocab_size_bound(texts, family):
    for vocab_size in (300, 1000):
        assert len(train_tokenizer(texts, family, vocab_size, 64)) <= vocab_size
    assert len(train_tokenizer(texts, Family.bert, 40, 64)) <= 40  # tiny: the alphabet is limited


def test_special_tokens(trained):
    gpt2 = trained[Family.gpt2]
    assert gpt2.eos_token == gpt2.bos_token == "<|endoftext|>"
    assert gpt2.pad_token == "<pad>" and gpt2.pad_token_id != gpt2.eos_token_id

    llama = trained[Family.llama]
    assert (llama.bos_token, llama.eos_token, llama.unk_token, llama.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert len({llama.bos_token_id, llama.eos_token_id, llama.unk_token_id, llama.pad_token_id}) == 4

    bert = trained[Family.bert]
    ids = [bert.pad_token_id, bert.unk_token_id, bert.cls_token_id, bert.sep_token_id, bert.mask_token_id]
    assert None not in ids and len(set(ids)) == 5
    assert bert.convert_ids_to_tokens(ids) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    roberta = trained[Family.roberta]
    assert roberta.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert roberta.cls_token_id == roberta.bos_token_id == 0 and roberta.sep_token_id == roberta.eos_token_id == 2
    assert roberta.mask_token_id is not None and roberta.pad_token_id == 1


def test_added_special_tokens_per_family(trained):
    for family in (Family.gpt2, Family.llama):  # ftk joins documents with eos itself: nothing added
        tok = trained[family]
        assert tok("hello world")["input_ids"] == tok("hello world", add_special_tokens=False)["input_ids"]
    bert = trained[Family.bert]
    enc = bert("Hello world", "second")
    tokens = bert.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
    assert enc["token_type_ids"][-1] == 1 and enc["token_type_ids"][0] == 0
    assert bert.decode(bert("Hello World")["input_ids"], skip_special_tokens=True) == "hello world"
    roberta = trained[Family.roberta]
    tokens = roberta.convert_ids_to_tokens(roberta("Hello", "world")["input_ids"])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and tokens.count("</s>") == 3


@pytest.mark.parametrize("family", list(Family))
def test_save_and_reload_with_plain_transformers(trained, family, tmp_path):
    tok = trained[family]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for args in ((TRICKY,), ("first part", "second part"), ("<mask> [MASK] <|endoftext|>",)):
        assert again(*args)["input_ids"] == tok(*args)["input_ids"]
    assert again.all_special_ids == tok.all_special_ids
    assert (again.pad_token_id, again.eos_token_id, again.mask_token_id) == (
        tok.pad_token_id, tok.eos_token_id, tok.mask_token_id)
    assert again.model_max_length == 128
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path))) == tokenizer_fingerprint(tok)


def test_fingerprint(trained, texts):
    tok = trained[Family.gpt2]
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(tok)
    assert fp != tokenizer_fingerprint(train_tokenizer(texts, Family.gpt2, VOCAB - 100, 128))
    assert len({tokenizer_fingerprint(t) for t in trained.values()}) == len(Family)
    tok(["a b c d e f g h", "a"], padding=True, truncation=True, max_length=4)  # per-call backend settings
    assert tokenizer_fingerprint(tok) == fp


def test_train_rejects_bad_input(texts):
    with pytest.raises(UsageError, match="vocab_size"):
        train_tokenizer(texts, Family.gpt2, 200, 64)
    with pytest.raises(UsageError, match="no text"):
        train_tokenizer(["", ""], Family.llama, 1000, 64)


def test_load_tokenizer_errors(tmp_path):
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path, "no tokenizer in")):
        with pytest.raises(UsageError, match=message) as e:
            load_tokenizer(str(path))
        assert str(path) in str(e.value) and "model.tokenizer=" in str(e.value) and "\n" not in str(e.value)


def test_load_tokenizer_sets_pad_to_eos(trained, tmp_path):
    # A fresh copy: transformers leaves the last call's padding (pad token "<pad>") set on the backend,
    # and a saved padding setting would give the reloaded tokenizer a pad token.
    backend = Tokenizer.from_str(trained[Family.gpt2].backend_tokenizer.to_str())
    backend.no_padding()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id


def test_packing_is_not_truncated_by_an_earlier_truncating_call(trained):
    """A tokenizer call with truncation=True leaves the Rust backend truncating; packing must not inherit it."""
    from ftk.data import lm

    trained = trained[Family.gpt2]
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 50)
    before = lm.pack([text], trained, 16, lm.Layout.for_objective("clm", trained))
    trained([text], truncation=True, max_length=8)
    after = lm.pack([text], trained, 16, lm.Layout.for_objective("clm", trained))
    assert len(before) > 10 and (after == before).all()
