"""Streaming preparation of pretraining corpora (ftk/data/prepare.py, ftk/data/stream.py): the same blocks as
packing in memory, whatever the batch size and number of processes; a cache found by file stats; compressed and
sharded inputs; bad shards stop with one line; `ftk prepare` then `ftk pretrain` from its cache."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from ftk.data import lm, prepare, stream
from ftk.errors import UsageError
from tests.conftest import TINY_GPT, ftk, make_corpus

DOCS = make_corpus(n_docs=80, words_per_doc=60, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    from ftk.data.tokenizer import train_tokenizer
    from ftk.schemas import Family

    return train_tokenizer(DOCS, Family.gpt2, 400, 128)


@pytest.fixture(scope="module")
def bert_tokenizer():
    from ftk.data.tokenizer import train_tokenizer
    from ftk.schemas import Family

    return train_tokenizer(DOCS, Family.bert, 400, 128)


def data_cfg(path, **extra):
    from ftk.schemas import DataConfig

    cfg = OmegaConf.structured(DataConfig)
    cfg.path = str(path)
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def write_shards(folder: Path, docs, per_shard: int = 20, suffix: str = ".jsonl", opener=open) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(docs), per_shard):
        with opener(folder / f"shard-{i // per_shard:03d}{suffix}", "wt", encoding="utf-8") as f:
            for doc in docs[i:i + per_shard]:
                f.write(json.dumps({"text": doc, "id": i}) + "\n")
    return folder


def run_prepare(path, tok, cache, objective="clm", seq_len=32, num_proc=1, **extra):
    from ftk.data.tokenizer import tokenizer_fingerprint

    corpus = stream.resolve(data_cfg(path, **extra), seed=0)
    return prepare.prepare(corpus, tok, tokenizer_fingerprint(tok), seq_len, objective, cache, num_proc=num_proc)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_streamed_blocks_equal_packing_in_memory_for_any_batch_and_process_count(objective, tokenizer,
                                                                                 bert_tokenizer, tmp_path, monkeypatch):
    tok = tokenizer if objective == "clm" else bert_tokenizer
    shards = write_shards(tmp_path / "shards", DOCS)
    held = [d for d in DOCS if stream.held_out(d, 0, 0.05)]
    kept = [d for d in DOCS if not stream.held_out(d, 0, 0.05)]
    assert held and kept  # the hash holds some documents out
    layout = lm.Layout.for_objective(objective, tok)
    expected_train, expected_valid = lm.pack(kept, tok, 32, layout), lm.pack(held, tok, 32, layout)
    results = []
    for batch_docs, num_proc in ((1000, 1), (7, 1), (7, 2)):  # small batches carry tokens across batch ends
        monkeypatch.setattr(prepare, "BATCH_DOCS", batch_docs)
        got = run_prepare(shards, tok, tmp_path / f"cache-{batch_docs}-{num_proc}", objective, num_proc=num_proc)
        assert not got.packed.cache_hit and got.stats.num_proc == num_proc
        assert np.array_equal(got.packed.train, expected_train)
        assert np.array_equal(got.packed.validation, expected_valid)
        assert got.stats.documents == len(DOCS) and got.stats.validation_documents == len(held)
        results.append((got.folder / "train.npy").read_bytes())
    assert results[0] == results[1] == results[2]  # byte for byte, whatever the batches and processes
    assert isinstance(got.packed.train, np.memmap)


def test_small_corpus_validates_on_the_tail_of_the_stream(tokenizer, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for i, doc in enumerate(DOCS[:5]):
        (folder / f"d{i}.txt").write_text(doc)
    got = run_prepare(folder, tokenizer, tmp_path / "cache")
    whole = lm.pack(DOCS[:5], tokenizer, 32, lm.Layout.for_objective("clm", tokenizer))
    n_valid = max(1, len(whole) // 20)
    assert got.stats.validation == "tail of the token stream"
    assert np.array_equal(got.packed.train, whole[:-n_valid]) and np.array_equal(got.packed.validation,
                                                                                  whole[-n_valid:])


def test_restart_reads_no_text_and_changed_text_or_tokenizer_is_never_stale(tokenizer, bert_tokenizer, tmp_path,
                                                                             monkeypatch):
    shards = write_shards(tmp_path / "shards", DOCS)
    cache = tmp_path / "cache"
    first = run_prepare(shards, tokenizer, cache)
    real_read, real_hash = stream._file_documents, stream.Corpus.content_fingerprint
    calls = {"read": 0, "hash": 0}

    def counting_read(*a, **k):
        calls["read"] += 1
        return real_read(*a, **k)

    def counting_hash(self):
        calls["hash"] += 1
        return real_hash(self)

    monkeypatch.setattr(stream, "_file_documents", counting_read)
    monkeypatch.setattr(stream.Corpus, "content_fingerprint", counting_hash)
    again = run_prepare(shards, tokenizer, cache)
    assert again.packed.cache_hit and again.folder == first.folder and calls == {"read": 0, "hash": 0}
    # touched (mtime changed), same bytes: hashed once, then found without tokenizing
    target = shards / "shard-001.jsonl"
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    touched = run_prepare(shards, tokenizer, cache)
    assert touched.packed.cache_hit and touched.folder == first.folder and calls == {"read": 0, "hash": 1}
    # changed text of the same size and a later mtime: a new entry, really tokenized
    text = target.read_text()
    target.write_text(text.replace("the", "THE", 1))
    changed = run_prepare(shards, tokenizer, cache)
    assert not changed.packed.cache_hit and changed.folder != first.folder and calls["read"] > 0
    # another tokenizer: its own entry
    other = run_prepare(shards, bert_tokenizer, cache, objective="mlm")
    assert not other.packed.cache_hit and other.folder not in (first.folder, changed.folder)


def test_compressed_shards_globs_and_empty_shards(tokenizer, tmp_path):
    import zstandard

    plain = run_prepare(write_shards(tmp_path / "plain", DOCS), tokenizer, tmp_path / "c1")
    write_shards(tmp_path / "mixed", DOCS[:40], suffix=".jsonl.gz", opener=gzip.open)

    def zst_open(path, mode, encoding):
        return zstandard.open(path, mode, encoding=encoding)

    write_shards(tmp_path / "mixed" / "zz", DOCS[40:], suffix=".jsonl.zst", opener=zst_open)
    (tmp_path / "mixed" / "zz" / "shard-099.jsonl.zst").write_bytes(zstandard.compress(b""))  # empty shard
    (tmp_path / "mixed" / "shard-050.jsonl").write_text("")  # an empty plain shard
    folder = run_prepare(tmp_path / "mixed", tokenizer, tmp_path / "c2")
    assert np.array_equal(folder.packed.train, plain.packed.train)
    assert np.array_equal(folder.packed.validation, plain.packed.validation)
    assert len(folder.stats.empty_shards) == 2
    by_glob = run_prepare(f"{tmp_path}/mixed/**/*.jsonl.*", tokenizer, tmp_path / "c3")
    assert np.array_equal(by_glob.packed.train, plain.packed.train) and by_glob.stats.empty_shards[0].endswith(
        "shard-099.jsonl.zst")


def test_bad_shards_are_one_line_usage_errors_and_leave_no_cache(tokenizer, tmp_path):
    shards = write_shards(tmp_path / "shards", DOCS)
    (shards / "shard-009.jsonl.gz").write_text('{"text": "this is not gzip data"}\n')
    with pytest.raises(UsageError, match=r"shard-009.jsonl.gz is not gzip data"):
        run_prepare(shards, tokenizer, tmp_path / "cache")
    (shards / "shard-009.jsonl.gz").unlink()
    (shards / "shard-009.jsonl.zst").write_text("plain text\n")
    with pytest.raises(UsageError, match=r"shard-009.jsonl.zst is not zstd data"):
        run_prepare(shards, tokenizer, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.endswith(".lock")] == []


def test_a_shard_that_disappears_is_said_and_never_served_stale(tokenizer, tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "shards", DOCS)
    cache = tmp_path / "cache"
    corpus = stream.resolve(data_cfg(shards), seed=0)
    (shards / "shard-002.jsonl").unlink()  # listed, then gone before it is read
    from ftk.data.tokenizer import tokenizer_fingerprint

    with pytest.raises(UsageError, match="shard-002.jsonl disappeared"):
        prepare.prepare(corpus, tokenizer, tokenizer_fingerprint(tokenizer), 32, "clm", cache, num_proc=1)
    full = run_prepare(shards, tokenizer, cache)  # between runs: the corpus is what is there now
    assert full.stats.documents == len(DOCS) - 20


def test_one_preparer_per_cache_location_the_others_wait(tokenizer, tmp_path):
    shards = write_shards(tmp_path / "shards", DOCS)
    cache = tmp_path / "cache"
    corpus = stream.resolve(data_cfg(shards), seed=0)
    from ftk.data.tokenizer import tokenizer_fingerprint

    corpus = stream.resolve(data_cfg(shards), seed=0)
    key = prepare.cache_key(corpus, cache, tokenizer_fingerprint(tokenizer), 32,
                            lm.Layout.for_objective("clm", tokenizer))
    said = []
    result = {}
    with prepare.preparer_lock(cache / "tokens" / f"{key}.lock", None, "test"):  # another process is preparing
        waiter = threading.Thread(target=lambda: result.update(
            got=prepare.prepare(corpus, tokenizer, tokenizer_fingerprint(tokenizer), 32, "clm", cache,
                                num_proc=1, say=said.append)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and any("another process is preparing" in s for s in said)
        # what the lock holder does (flock: a second open of the lock file, even in this process, waits)
        prepare._prepare_into(cache / "tokens" / key, corpus, tokenizer, 32, lm.Layout.for_objective("clm", tokenizer),
                              1, None, False)
    waiter.join(30)
    assert result["got"].packed.cache_hit  # ... and the waiter takes its result instead of preparing again


def test_out_of_disk_leaves_no_partial_cache(tmp_path):
    """RLIMIT_FSIZE (with SIGXFSZ ignored) makes writing the token cache fail like a full disk: exit 2, one line,
    nothing under tokens/ a later run could take for a cache."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_corpus(n_docs=60, words_per_doc=400)):
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    cache = tmp_path / "cache"
    args = [*TINY_GPT, f"data.path={corpus}", "data.num_proc=1", f"hydra.run.dir={tmp_path / 'run'}"]
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))\n"
            "from ftk.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "prepare", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FTK_CACHE": str(cache)})
    lines = [x for x in done.stderr.splitlines() if x.startswith("ftk prepare:")]
    assert done.returncode == 2 and len(lines) == 1 and "ran out of disk space" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert [p.name for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")] == []


def test_prepare_then_pretrain_starts_from_the_cache(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTK_CACHE", str(tmp_path / "cache"))
    assert ftk("prepare", *TINY_GPT, f"data.path={corpus_dir}", f"hydra.run.dir={tmp_path / 'prep'}") == 0
    out = capsys.readouterr()
    for word in ("documents", "tokens", "blocks", "input bytes", "cache bytes", "tokens/s", str(tmp_path / "cache")):
        assert word in out.out, out.out
    assert not (tmp_path / "prep").exists()  # nothing written but the cache

    def no_text(*a, **k):
        raise AssertionError("pretrain read the corpus although it was prepared")

    monkeypatch.setattr(stream, "_file_documents", no_text)
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=2",
               f"hydra.run.dir={tmp_path / 'run'}") == 0
    err = capsys.readouterr().err
    assert "(from cache)" in err and "cached gpt2 tokenizer" in err


def test_tokenizer_learns_from_a_bounded_stream_of_training_documents(tmp_path):
    from ftk.lm_setup import tokenizer_sample

    corpus = stream.resolve(data_cfg(write_shards(tmp_path / "shards", DOCS)), seed=0)
    everything = list(tokenizer_sample(corpus, max_chars=10**9))
    assert everything == [d for d in DOCS if not stream.held_out(d, 0, 0.05)]  # held-out text is never learnt from
    some = list(tokenizer_sample(corpus, max_chars=1000))
    assert some == everything[:len(some)] and sum(map(len, some[:-1])) < 1000 <= sum(map(len, some))


def test_a_batch_log_gets_progress_lines_with_an_eta(tokenizer, tmp_path, monkeypatch, capsys):
    from ftk.data.tokenizer import tokenizer_fingerprint

    monkeypatch.setattr(prepare.Bar, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(prepare, "BATCH_DOCS", 10)
    corpus = stream.resolve(data_cfg(write_shards(tmp_path / "shards", DOCS)), seed=0)
    prepare.prepare(corpus, tokenizer, tokenizer_fingerprint(tokenizer), 32, "clm", tmp_path / "cache", num_proc=1,
                    say=print)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("prepare: ")]
    assert len(lines) >= 5 and all("tokens/s, ETA" in x for x in lines) and lines[-1].startswith("prepare: 100%")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_loaded_by_name_streams_through_the_same_preparation(streaming, tokenizer, tmp_path, monkeypatch):
    """The hub path (load_dataset by name; data.streaming=true gives an IterableDataset), exercised offline on a
    local dataset folder passed as a name: the same blocks as the same documents read as local files."""
    folder = write_shards(tmp_path / "dataset" / "data", DOCS)
    as_files = run_prepare(folder, tokenizer, tmp_path / "c1")
    monkeypatch.setattr(stream.sources, "is_local", lambda path: False)
    by_name = run_prepare(tmp_path / "dataset", tokenizer, tmp_path / "c2", streaming=streaming)
    assert np.array_equal(by_name.packed.train, as_files.packed.train)
    assert np.array_equal(by_name.packed.validation, as_files.packed.validation)
    again = run_prepare(tmp_path / "dataset", tokenizer, tmp_path / "c2", streaming=streaming)
    assert again.packed.cache_hit and again.folder == by_name.folder


def test_a_corpus_whose_documents_all_land_in_validation_trains_on_them(tmp_path):
    """Duplicates share a side of the hash split: a corpus of one text repeated is held out whole or not at
    all; held out whole, it trains on every document and validates on the tail (before: 'fewer than 64 tokens')."""
    from ftk.data import stream

    text = "zebra " * 200
    seed = next(s for s in range(1000) if stream.held_out(text, s, 0.05))  # a seed that holds this text out
    corpus = tmp_path / "same.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(30)))
    run = tmp_path / "run"
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus}", f"train.seed={seed}", "train.max_steps=1",
               f"hydra.run.dir={run}") == 0
