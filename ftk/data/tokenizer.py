"""Tokenizers: train one for a model built from scratch, or load a given one.

Trained tokenizers follow their family's conventions, built with the `tokenizers` library and wrapped
in a transformers fast tokenizer, so `save_pretrained(dir)` writes a tokenizer.json that plain
`transformers.AutoTokenizer.from_pretrained(dir)` loads back with identical ids:

    gpt2     byte-level BPE, <|endoftext|> as bos/eos/unk, plus a dedicated <pad>
    llama    byte-level BPE, <unk> <s> </s>, plus a dedicated <pad>
    bert     lowercasing WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK], "[CLS] A [SEP] B [SEP]"
    roberta  byte-level BPE, <s> <pad> </s> <unk> <mask>, "<s> A </s></s> B </s>"

The byte-level vocabularies start from all 256 bytes and have no normalizer, so decoder text
round-trips exactly (decode(encode(text)) == text, whatever the script). Decoders get no bos/eos
added on encode: ftk joins documents with eos itself. The padding token is never eos, so padding is
never confused with a real end of text.

`tokenizer_fingerprint` hashes whatever decides the ids, as a cache key for tokenized data.
"""

from __future__ import annotations

import hashlib
import json
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator, List

from ftk.errors import UsageError
from ftk.schemas import Family

TRAIN_BATCH = 1000        # texts per batch fed to the (multi-threaded) trainer
BERT_MAX_ALPHABET = 1000  # single characters kept by WordPiece, like BERT's ~1k in 30k

# Files any transformers tokenizer directory holds at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def train_tokenizer(texts: Iterable[str], family: Family, vocab_size: int, model_max_length: int):
    """A new `family`-style tokenizer of at most `vocab_size` tokens (specials included), trained on texts.

    Returns a `transformers.PreTrainedTokenizerFast` (in transformers 5: `TokenizersBackend`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    family = Family(family)
    if family is Family.bert:
        specials: List[Any] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        minimum = len(specials) + 2
    else:
        specials = {
            Family.gpt2: ["<|endoftext|>", "<pad>"],
            Family.llama: ["<unk>", "<s>", "</s>", "<pad>"],
            # RoBERTa's order (<s>=0, <pad>=1, </s>=2, <unk>=3); <mask> swallows the space before it,
            # so "a <mask>" predicts the token " word" that a space-prefixed word really is.
            Family.roberta: ["<s>", "<pad>", "</s>", "<unk>",
                             AddedToken("<mask>", lstrip=True, special=True, normalized=False)],
        }[family]
        minimum = 256 + len(specials)  # every byte is a token
    if vocab_size < minimum:
        raise UsageError(f"model.vocab_size={vocab_size} is too small for a {family.value} tokenizer: "
                         f"pass model.vocab_size>={minimum} (a few thousand is typical for small corpora)")

    if family is Family.bert:
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)  # also strips accents, like uncased BERT
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        # The trainer keeps every character it sees, which alone can exceed a small vocab_size;
        # limit the alphabet so characters and their "##" forms fit at most half of it.
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, continuing_subword_prefix="##", show_progress=False,
            limit_alphabet=max(1, min(BERT_MAX_ALPHABET, (vocab_size - len(specials)) // 4)))
    else:
        unk = "<unk>" if family is not Family.gpt2 else None  # never produced: every byte has a token
        backend = Tokenizer(models.BPE(unk_token=unk))
        # add_prefix_space=False: "hello" must decode to "hello", not " hello".
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, even unseen ones
    batches = _batches(texts)
    first = next(batches, None)  # checked before training, not left to the trainer
    if first is None:
        raise UsageError("no text to train a tokenizer on: pass data.path=<files with text>, "
                         "or a trained tokenizer with model.tokenizer=<dir or hub name>")
    backend.train_from_iterator(chain([first], batches), trainer=trainer)

    ids = {str(t): backend.token_to_id(str(t)) for t in specials}
    kwargs: dict = {"model_max_length": model_max_length}
    if family is Family.bert:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        kwargs.update(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                      mask_token="[MASK]",
                      # as an init argument (not an attribute) so it is saved: BERT uses segment ids
                      model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    elif family is Family.roberta:
        backend.post_processor = processors.RobertaProcessing(  # (sep, cls): the 2nd keyword is cls_token
            ("</s>", ids["</s>"]), ("<s>", ids["<s>"]), trim_offsets=True, add_prefix_space=False)
        kwargs.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                      sep_token="</s>", mask_token=specials[-1])
    else:
        # No post-processor of our own: with add_bos_token/add_eos_token False, transformers installs a
        # TemplateProcessing that adds nothing ("$A" / "$A $B"), and keeps it when reloading.
        bos, eos, unk = ("<|endoftext|>",) * 3 if family is Family.gpt2 else ("<s>", "</s>", "<unk>")
        kwargs.update(bos_token=bos, eos_token=eos, unk_token=unk, pad_token="<pad>",
                      add_bos_token=False, add_eos_token=False)

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if len(tokenizer) > vocab_size:  # the trainers count specials and the alphabet; guard anyway
        raise RuntimeError(f"trained tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    return tokenizer


def _batches(texts: Iterable[str]) -> Iterator[List[str]]:
    """Non-empty lists of up to TRAIN_BATCH texts, empty texts dropped."""
    it = iter(texts)
    while True:
        chunk = list(islice(it, TRAIN_BATCH))
        if not chunk:
            return
        batch = [t for t in chunk if t]
        if batch:
            yield batch


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of everything that decides token ids: the backend's JSON and the special tokens.

    The backend's truncation/padding settings are left out: transformers changes them per call, and
    they do not change which ids a text becomes.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    specials = {name: [str(getattr(tokenizer, name, None)), getattr(tokenizer, name + "_id", None)]
                for name in names}
    specials["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    specials["add_eos_token"] = bool(getattr(tokenizer, "add_eos_token", False))
    blob = json.dumps({"backend": backend, "special": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A saved tokenizer (local directory or hub name) via AutoTokenizer, with a pad token guaranteed
    when it has an eos (GPT-2 checkpoints ship without one: pad = eos, as is common)."""
    from transformers import AutoTokenizer

    fix = "pass model.tokenizer=<tokenizer dir or hub name>"
    path = Path(name_or_path).expanduser()
    local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.endswith("/") \
        or name_or_path.count("/") > 1  # hub names are "name" or "org/name"
    if local:
        if not path.exists():
            raise UsageError(f"tokenizer path {name_or_path} does not exist: {fix}")
        if not path.is_dir():
            raise UsageError(f"tokenizer path {name_or_path} is a file: pass its folder (model.tokenizer=<dir>)")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UsageError(f"no tokenizer in {name_or_path}: {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if local else name_or_path,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # not on the hub / offline / unreadable files: say which, in one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"in {name_or_path}" if local else f"for {name_or_path}"
        raise UsageError(f"could not load a tokenizer {where} ({reason}); {fix}") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def appends_eos(tokenizer: Any) -> bool:
    """Whether `tokenizer(text)` ends a text with eos by itself (a tokenizer saved by `as_trained`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    return bool(ids) and ids[-1] == eos and tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"][-1:] != [eos]


def as_trained(tokenizer: Any, append_eos: bool, padding_side: str) -> Any:
    """A copy of `tokenizer` that plain transformers uses as the model was trained: `tokenizer(text)` ends with
    the end-of-text token a decoder classifier reads its class from (the post-processor in tokenizer.json does
    it), and batches are padded on the side the model was trained with (tokenizer_config.json)."""
    import copy

    out = copy.deepcopy(tokenizer)
    out.padding_side = padding_side
    out.init_kwargs["padding_side"] = padding_side
    if append_eos and not appends_eos(out) and hasattr(out, "update_post_processor"):
        out.add_eos_token = True  # rebuilds the post-processor: "$A <eos>"
    return out
