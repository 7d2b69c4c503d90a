"""Classification data: {text, label} records from any source `datasets` reads, tokenized once.

Class names are the training labels, sorted (as strings); they travel with the model in its
config (id2label), so predictions come back as names. Validation is the given file or a seeded,
per-class share of the training records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ftk.data import sources
from ftk.data.examples import Example
from ftk.errors import UsageError


@dataclass
class LabelledSplits:
    train: List[Tuple[str, str]]       # (text, label name)
    validation: List[Tuple[str, str]]
    labels: List[str]                  # class names; index = class id
    description: str


def _records(data: Any, path: str, split: str, exclude=()) -> List[Tuple[str, str]]:
    ds = sources.load_records(path, hub_config=data.hub_config, split=split, exclude=exclude)
    for column, key in ((data.text_column, "text_column"), (data.label_column, "label_column")):
        if column not in ds.column_names:
            raise UsageError(f"{path} has no column '{column}'; its columns are {', '.join(ds.column_names)}: "
                             f"pass data.{key}=<one of them>")
    out = []
    for row, (text, label) in enumerate(zip(ds[data.text_column], ds[data.label_column]), 1):
        if label is None or (isinstance(label, str) and not label.strip()):
            raise UsageError(f"{path}: record {row} has no label in column '{data.label_column}'; "
                             "label every record or remove it")
        if isinstance(text, str) and text.strip():
            out.append((text, str(label)))
    if not out:
        raise UsageError(f"{path} holds no text in column '{data.text_column}': the dataset is empty")
    return out


def load_labelled(data: Any, seed: int, default_paths: Optional[Tuple[str, str]] = None) -> LabelledSplits:
    """Training and validation records; `default_paths` (train, validation) when data.path is unset."""
    path, validation_path, description = data.path, data.validation_path, data.path
    if path is None:
        path, validation_path = default_paths
        description = "embedded task (which stdlib package a docstring comes from)"
    excluded = sources.list_files(validation_path) if validation_path and sources.is_local(validation_path) else []
    train = _records(data, path, data.split, exclude=excluded)
    if data.max_documents:
        train = train[: data.max_documents]
    if validation_path:
        validation = _records(data, validation_path, data.validation_split or data.split)
    elif data.validation_split and not sources.is_local(path):
        validation = _records(data, path, data.validation_split)
    else:
        train, validation = _hold_out(train, data.validation_fraction, seed)
    labels = sorted({label for _, label in train}, key=_label_order)  # before sampling: every class keeps its id
    if data.train_examples:
        if data.train_examples > len(train):
            raise UsageError(f"data.train_examples={data.train_examples} is more than the {len(train):,} training "
                             "records; pass a smaller number, or data.train_examples=null for all of them")
        total = len(train)
        train = stratified_sample(train, data.train_examples, seed)
        description = f"{description} ({len(train):,} of {total:,} training records, stratified, seed {seed})"
    unseen = sorted({label for _, label in validation} - set(labels), key=_label_order)
    if unseen:
        raise UsageError(f"the validation data has label(s) {', '.join(map(repr, unseen[:5]))} that the training "
                         f"data never has (training labels: {', '.join(map(repr, labels[:10]))}); fix the labels "
                         "or the files")
    if len(labels) < 2:
        raise UsageError(f"the training data has a single label {labels[0]!r}; classification needs at least two")
    return LabelledSplits(train, validation, labels, description)


def load_test(data: Any, labels: List[str]) -> List[Tuple[str, str]]:
    """data.test_path's records; a class the training data never had cannot be predicted, so it stops here."""
    test = _records(data, data.test_path, data.validation_split or data.split)
    unseen = sorted({label for _, label in test} - set(labels), key=_label_order)
    if unseen:
        raise UsageError(f"data.test_path={data.test_path} has label(s) {', '.join(map(repr, unseen[:5]))} that the "
                         f"training data never has (training labels: {', '.join(map(repr, labels[:10]))}); fix the "
                         "labels or the files")
    return test


def _label_order(label: str):
    """Numbers in numeric order ("2" before "10"), then names alphabetically."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def stratified_sample(records: List[Tuple[str, str]], n: int, seed: int) -> List[Tuple[str, str]]:
    """n records keeping the classes' shares (largest remainders; every class at least one when n allows),
    drawn with `seed`. One seeded order per class, cut at its count: a larger n keeps the smaller n's records
    (nested samples make a learning curve's points differ by data added, not by a new draw)."""
    rng = np.random.default_rng(seed)
    by_label: Dict[str, List[int]] = {}
    for i, (_, label) in enumerate(records):
        by_label.setdefault(label, []).append(i)
    names = sorted(by_label, key=_label_order)
    exact = np.array([n * len(by_label[name]) / len(records) for name in names])
    counts = np.floor(exact).astype(int)
    if n >= len(names):
        counts = np.maximum(counts, 1)
    while counts.sum() > n:  # the minimum of one per class overshot: take back from the largest classes
        counts[int(np.argmax(counts - exact))] -= 1
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    chosen = []
    for name, count in zip(names, counts):
        chosen += rng.permutation(by_label[name])[:count].tolist()
    return [records[i] for i in sorted(chosen)]


def _hold_out(records: List[Tuple[str, str]], fraction: float, seed: int):
    """A seeded share of each class held out, so every class appears in validation."""
    rng = np.random.default_rng(seed)
    by_label: Dict[str, List[int]] = {}
    for i, (_, label) in enumerate(records):
        by_label.setdefault(label, []).append(i)
    held = set()
    for label, indices in by_label.items():
        if len(indices) < 2:
            continue
        n = max(1, int(round(len(indices) * fraction)))
        held.update(rng.permutation(indices)[:n].tolist())
    if not held:
        raise UsageError("too few training records to hold some out for validation; pass data.validation_path")
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def tokenize(records: List[Tuple[str, str]], labels: List[str], tokenizer: Any, max_len: int,
             append_eos: bool) -> List[Example]:
    """Examples of at most max_len tokens; decoders get an end-of-text token to read the class from."""
    from ftk.data.tokenizer import appends_eos

    index = {name: i for i, name in enumerate(labels)}
    texts = [text for text, _ in records]
    # A tokenizer saved with a model (ftk.data.tokenizer.as_trained) may add the eos itself, inside max_len.
    append_eos = append_eos and not appends_eos(tokenizer)
    budget = max_len - 1 if append_eos else max_len
    encoded = tokenizer(texts, truncation=True, max_length=budget, add_special_tokens=True, verbose=False)["input_ids"]
    out = []
    for ids, (_, label) in zip(encoded, records):
        if append_eos:
            ids = list(ids) + [tokenizer.eos_token_id]
        out.append(Example(input_ids=list(ids), label=index[label]))
    return out
