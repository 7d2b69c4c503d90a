"""Shared fixtures: an isolated cache, tiny data made on the spot, and an in-process `ftk` runner."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One cache per test session: tokenized data and trained tokenizers are reused across tests,
    # never taken from (or left in) the user's ~/.cache/ftk.
    monkeypatch.setenv("FTK_CACHE", str(tmp_path_factory.getbasetemp() / "ftk-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def ftk(*args: str) -> int:
    """Run the CLI in this process (fast: torch and transformers stay imported between calls)."""
    from ftk.cli.main import main

    return main(list(args))


def ftk_subprocess(*args: str, timeout: float = 600, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would: a fresh process, real exit code and streams."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ftk.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will can more "
         "time out up about into than them only other new some could these two may first then do any like "
         "my now over such our man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people how too little state good "
         "very make world still own see men work long get here between both life being under never day "
         "same another know while last might us great old year off come since against go came right used "
         "take three").split()


def make_corpus(n_docs: int = 120, words_per_doc: int = 120, seed: int = 0) -> List[str]:
    """Text with learnable structure: a few recurring sentence templates over a small vocabulary."""
    rng = random.Random(seed)
    templates = [
        "the {a} of the {b} was {c} and {d} .",
        "{a} {b} {c} to the {d} .",
        "when the {a} came , the {b} said {c} {d} .",
        "it is {a} that {b} {c} {d} .",
    ]
    docs = []
    for _ in range(n_docs):
        sentences = []
        while sum(len(s.split()) for s in sentences) < words_per_doc:
            t = rng.choice(templates)
            sentences.append(t.format(**{k: rng.choice(WORDS) for k in "abcd"}))
        docs.append(" ".join(sentences).capitalize())
    return docs


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(make_corpus()):
        (folder / f"doc{i:03d}.txt").write_text(doc + "\n")
    return folder


TINY_GPT = ["model=gpt-tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
            "model.vocab_size=512", "model.max_position_embeddings=128", "hardware=cpu",
            "hardware.precision=fp32", "train.seq_len=64", "train.batch_size=8", "train.warmup_steps=5",
            "train.lr=3e-3", "train.log_every=5", "train.eval_batches=4"]
TINY_BERT = ["model=bert-tiny", "objective=mlm", "model.hidden_size=64", "model.num_layers=2",
             "model.num_heads=2", "model.vocab_size=512", "model.max_position_embeddings=128", "hardware=cpu",
             "hardware.precision=fp32", "train.seq_len=64", "train.batch_size=8", "train.warmup_steps=5",
             "train.lr=3e-3", "train.log_every=5", "train.eval_batches=4"]


def make_labelled(n: int, seed: int = 0, classes=("apple", "river", "stone")) -> List[dict]:
    """Records whose label is the one class keyword hidden among common words: learnable in a few steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        words.insert(rng.randint(0, len(words)), label)
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, records) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ISOLATED = ("FTK_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE")


@contextlib.contextmanager
def isolated_environment(tmp_path_factory):
    """What `_isolated_cache` sets, for module/session fixtures (which cannot use monkeypatch)."""
    saved = {k: os.environ.get(k) for k in ISOLATED}
    os.environ.update(FTK_CACHE=str(tmp_path_factory.getbasetemp() / "ftk-cache"),
                      HF_DATASETS_CACHE=str(tmp_path_factory.getbasetemp() / "hf-datasets"), HF_HUB_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """Tiny GPT and BERT pretrained once per test session with `ftk pretrain`: {"gpt": final/, "bert": final/}."""
    root = tmp_path_factory.mktemp("pretrained")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_corpus()):
        (corpus / f"doc{i:03d}.txt").write_text(doc + "\n")
    with isolated_environment(tmp_path_factory):
        out = {}
        for name, args in (("gpt", TINY_GPT), ("bert", TINY_BERT)):
            run = root / name
            assert ftk("pretrain", *args, f"data.path={corpus}", "train.max_steps=40",
                       f"hydra.run.dir={run}") == 0
            out[name] = run / "final"
        out["corpus"] = corpus
        return out
