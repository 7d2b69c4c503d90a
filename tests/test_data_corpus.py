"""The embedded corpus and classification task built from the standard library's docstrings."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from ftk.data import corpus
from ftk.errors import UsageError


def _records(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache directory, built once for the whole module (the build takes a couple of seconds)."""
    root = tmp_path_factory.mktemp("ftk-cache")
    corpus.embedded_corpus_path(root)
    corpus.embedded_task_paths(root)
    return root


def test_corpus_location_and_records(cache):
    path = corpus.embedded_corpus_path(cache)
    assert path.parent == cache / "corpus"
    assert path.name.startswith("stdlib-docstrings-py3.") and path.name.endswith("-v1.jsonl")
    docs = _records(path)
    assert len(docs) > 1000  # ~6,300 on CPython 3.11
    assert all(set(d) == {"text"} and len(d["text"]) >= corpus.MIN_DOCSTRING_CHARS for d in docs)
    texts = [d["text"] for d in docs]
    assert len(set(texts)) == len(texts)  # exact duplicates are kept once
    # cleandoc'ed (blank edge lines removed) and a well-known module docstring is there
    assert not any(t.startswith("\n") or t.endswith("\n") for t in texts)
    assert any(t.startswith("JSON (JavaScript Object Notation)") for t in texts)
    # the build leaves no temporary files behind
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_corpus_is_cached(cache, monkeypatch):
    path = corpus.embedded_corpus_path(cache)
    before = path.stat().st_mtime_ns

    def no_rebuild():
        raise AssertionError("the cached corpus was rebuilt")

    monkeypatch.setattr(corpus, "_stdlib_docstrings", no_rebuild)
    assert corpus.embedded_corpus_path(cache) == path
    assert corpus.embedded_task_paths(cache) == corpus.embedded_task_paths(cache)
    assert path.stat().st_mtime_ns == before


def test_corpus_is_deterministic(cache, tmp_path):
    corpus._stdlib_docstrings.cache_clear()  # really re-read the standard library
    again = corpus.embedded_corpus_path(tmp_path)
    assert again.read_bytes() == corpus.embedded_corpus_path(cache).read_bytes()
    train, validation = corpus.embedded_task_paths(tmp_path)
    cached_train, cached_validation = corpus.embedded_task_paths(cache)
    assert train.read_bytes() == cached_train.read_bytes()
    assert validation.read_bytes() == cached_validation.read_bytes()


def test_task_classes_balanced_and_split(cache):
    train_path, validation_path = corpus.embedded_task_paths(cache)
    assert corpus.embedded_task_path(cache) == train_path
    assert train_path.parent == cache / "corpus" and train_path.name.startswith("stdlib-task-py3.")
    train, validation = _records(train_path), _records(validation_path)
    assert all(set(r) == {"text", "label"} for r in train + validation)
    assert all(len(r["text"]) <= corpus.TASK_TEXT_CHARS for r in train + validation)

    counts = collections.Counter(r["label"] for r in train + validation)
    assert set(counts) == set(corpus.TASK_LABELS)
    assert len(set(counts.values())) == 1, counts  # every class capped at the same count
    assert next(iter(counts.values())) >= 50
    # both splits hold every class
    assert {r["label"] for r in train} == {r["label"] for r in validation} == set(corpus.TASK_LABELS)

    train_texts, validation_texts = {r["text"] for r in train}, {r["text"] for r in validation}
    assert not train_texts & validation_texts
    assert len(train_texts) == len(train) and len(validation_texts) == len(validation)  # no duplicates
    assert 0.1 < len(validation) / (len(train) + len(validation)) < 0.3  # ~80/20


def test_truncate_cuts_at_a_space():
    text = "word " * 200
    cut = corpus._truncate(text)
    assert len(cut) <= corpus.TASK_TEXT_CHARS and cut.endswith("word")
    assert corpus._truncate("short text") == "short text"


def test_no_stdlib_sources_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(corpus, "_stdlib_files", lambda: [])  # e.g. a Python shipped with .pyc files only
    with pytest.raises(UsageError, match="data.path="):
        corpus._stdlib_docstrings.__wrapped__()  # bypass the per-process cache
