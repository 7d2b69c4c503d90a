"""scripts/experiment_transfer.py on made-up data (a user's clone has no ../shared/data): the held-out book
passages never reach pretraining, the splits are disjoint, and --smoke runs every stage through the real
CLI to a report and two plots. The smoke run's numbers are not a measurement; only the wiring is checked."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import WORDS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import experiment_transfer as transfer  # noqa: E402  (scripts/ is not a package)


def fake_data(root: Path) -> Path:
    """gutenberg/ (four books, one too short for the task), sst2/, trec/ and wikitext-2/ in their real formats."""
    rng = random.Random(0)
    vocab = list(WORDS)
    books = root / "gutenberg"
    books.mkdir(parents=True)
    for i, (name, words) in enumerate((("alpha-one", 12000), ("beta-two", 12000), ("gamma-three", 12000),
                                       ("delta-short", 300))):
        own = vocab[i * 7:(i + 1) * 7]  # each book's own favourite words: attributable
        lines = [" ".join(rng.choice(own if rng.random() < 0.3 else vocab) for _ in range(12))
                 for _ in range(words // 12)]
        (books / f"{name}.txt").write_text("\r\n".join(lines))  # CRLF like Moby Dick
    sst2 = root / "sst2"
    sst2.mkdir()
    for split, n in (("train", 60), ("dev", 20), ("test", 20)):
        rows = [f"{k % 2} {' '.join(rng.choice(vocab) for _ in range(8))} {'good' if k % 2 else 'bad'}" for k in range(n)]
        (sst2 / f"stsa.binary.{split}").write_text("\n".join(rows) + "\n")
    trec = root / "trec"
    trec.mkdir()
    classes = ("DESC:manner", "HUM:ind", "LOC:city")
    for split, n in (("train", 540), ("test", 30)):
        rows = [f"{classes[k % 3]} {' '.join(rng.choice(vocab) for _ in range(6))} ?" for k in range(n)]
        (trec / f"{split}.txt").write_bytes(("\n".join(rows) + "\n").encode() + b"caf\xe9 \n")  # a non-UTF-8 byte
    wiki = root / "wikitext-2"
    wiki.mkdir()
    (wiki / "valid.txt").write_text("\n".join(" ".join(rng.choice(vocab) for _ in range(20)) for _ in range(300)))
    return root


def test_book_passages_are_held_out_of_pretraining_and_splits_are_disjoint(tmp_path):
    data = fake_data(tmp_path / "data")
    paths = transfer.book_task(data / "gutenberg", tmp_path / "out", max_per_class=5)
    pretraining = " ".join(p.read_text() for p in paths["pretrain"].glob("*.txt"))
    splits = {s: [json.loads(line) for line in paths[s].open()] for s in ("train", "dev", "test")}
    assert json.loads((tmp_path / "out" / "books-skipped.json").read_text()) == ["delta-short"]
    for split, records in splits.items():
        assert {r["label"] for r in records} == {"alpha-one", "beta-two", "gamma-three"}, split
        for r in records[:5]:
            assert r["text"] not in pretraining and len(r["text"].split()) == transfer.PASSAGE_WORDS
    texts = [{r["text"] for r in records} for records in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    # every book's first 85% is pretraining text, the short book included
    assert len(list(paths["pretrain"].glob("*.txt"))) == 4


def test_trec_coarse_labels_and_a_dev_split_held_out_of_train(tmp_path):
    data = fake_data(tmp_path / "data")
    paths = transfer.trec_task(data / "trec", tmp_path)
    train, dev = ([json.loads(line) for line in paths[s].open()] for s in ("train", "dev"))
    assert len(dev) == 500 and len(train) == 40  # 540 questions minus dev; the non-UTF-8 line has no question
    assert {r["label"] for r in train + dev} == {"DESC", "HUM", "LOC"}
    assert not {r["text"] for r in train} & {r["text"] for r in dev}


def test_evaluation_sets_are_capped_to_a_seeded_sample_in_file_order(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(f"{i}\n" for i in range(100)))
    transfer.cap(path, 30)
    kept = [int(line) for line in path.read_text().splitlines()]
    assert len(kept) == 30 and kept == sorted(kept) and kept != list(range(30))
    transfer.cap(path, 50)  # already smaller: untouched
    assert [int(line) for line in path.read_text().splitlines()] == kept


def test_verdict_calls_a_difference_clear_only_beyond_two_standard_errors():
    assert "clear" in transfer.verdict([0.8, 0.82, 0.81], [0.5, 0.52, 0.51])
    assert "within noise" in transfer.verdict([0.6, 0.7, 0.5], [0.55, 0.65, 0.6])
    assert "1 seed" in transfer.verdict([0.6], [0.5])


@pytest.mark.slow
def test_smoke_runs_every_stage_to_a_report(tmp_path):
    data = fake_data(tmp_path / "data")
    out = tmp_path / "report"
    cmd = [sys.executable, str(REPO / "scripts" / "experiment_transfer.py"), "--smoke", "--data", str(data),
           "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FTK_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "report.md").read_text()
    for section in ("## Pretraining", "## Learning rate", "## Data efficiency", "## Task-adaptive pretraining",
                    "## Regimes", "## Forgetting", "## In-context learning"):
        assert section in report
    for regime in transfer.REGIMES:
        assert f"| {regime} |" in report
    # pretrained and scratch cells of every curve point, two seeds each, and the adapted cells of SST-2 and TREC
    assert report.count("(n=2)") >= 10
    # task-adaptive pretraining: each model on its own objective and tokenizer, from its pretrained weights, on
    # every training text of the task and none of its dev (validation only) or test texts, then fine-tuned
    for task, model, objective in (("sst2", "bert", "mlm"), ("trec", "gpt", "clm")):
        run = out / "runs" / "adapt" / f"{task}-{model}"
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        pretrained = out / "runs" / f"pretrain-{model}" / "final"
        assert f"objective={objective}" in overrides and f"model.name_or_path={pretrained}" in overrides
        texts = [json.loads(line)["text"] for line in (out / "data" / f"{task}-train-texts.jsonl").open()]
        labelled = [json.loads(line) for line in (out / "data" / f"{task}-train.jsonl").open()]
        assert texts == [r["text"] for r in labelled]
        held = {json.loads(line)["text"] for split in ("dev", "test")
                for line in (out / "data" / f"{task}-{split}.jsonl").open()}
        assert not held & set(texts)
        assert (run / "final" / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()
        curve = out / "runs" / "curves" / f"{task}-{model}-adapted-n{'8' if task == 'sst2' else 'all'}" / "seed0"
        assert str(run / "final") in (curve / ".hydra" / "overrides.yaml").read_text()
    assert "| sst2 | bert | mlm | 60 |" in report and "| trec | gpt | clm | 40 |" in report
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "regimes.png").stat().st_size > 10_000
    # the mode's knobs reach the runs: the small pretraining shape, capped evaluation sets, scaled phases, rates
    overrides = (out / "runs" / "pretrain-gpt" / ".hydra" / "overrides.yaml").read_text()
    assert "model.hidden_size=128" in overrides and "train.lr=3e-3" in overrides
    assert sum(1 for _ in (out / "data" / "sst2-test.jsonl").open()) == 10
    regime_runs = out / "runs" / "regimes"
    assert "regime.head_steps=1" in (regime_runs / "7-head_then_full" / "seed0" / ".hydra" / "overrides.yaml").read_text()
    assert "train.lr=0.001" in (regime_runs / "0-full" / "seed0" / ".hydra" / "overrides.yaml").read_text()
    assert "| full, lr 0.001 |" in report and "except full 0.001" in report
    # finished runs are reused: a second invocation only rewrites the report
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0
    assert not [line for line in again.stdout.splitlines() if line.startswith("  ") and line.endswith(" ok")]


def test_missing_data_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "experiment_transfer.py"), "--data",
                           str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "pass --data DIR" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_sweep_counts_as_finished_only_when_every_seed_is(tmp_path):
    """Hydra goes on to the next seed when one is stopped (SIGTERM): the last seed's summary is not enough."""
    runner = transfer.Runner(jobs=1, log=tmp_path / "logs")
    sweep = tmp_path / "sweep"
    (sweep / "seed1").mkdir(parents=True)
    (sweep / "seed1" / "summary.json").write_text("{}")
    runner.ftk("stopped-seed0", transfer.seeds_done(sweep, 2), "--help")  # seed0 missing: runs again
    assert (tmp_path / "logs" / "stopped-seed0.log").exists() and runner.reused == 0
    (sweep / "seed0").mkdir()
    (sweep / "seed0" / "summary.json").write_text("{}")
    runner.ftk("finished", transfer.seeds_done(sweep, 2), "--help")
    assert not (tmp_path / "logs" / "finished.log").exists() and runner.reused == 1
