"""Bad input never costs work: each case below stops with one line that names the problem and the fix,
exit code 2, no traceback, and nothing a previous run wrote is lost. Numeric faults stop (exit 3) or
skip batches, and never leave a checkpoint with non-finite weights."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_GPT, ftk, make_corpus, write_jsonl


def _empty(tmp: Path, p) -> list:
    (tmp / "empty.txt").write_text("")
    return [f"data.path={tmp / 'empty.txt'}"]


def _malformed_jsonl(tmp: Path, p) -> list:
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    return [f"data.path={tmp / 'bad.jsonl'}"]


def _malformed_csv(tmp: Path, p) -> list:
    (tmp / "bad.csv").write_text("text,source\nfine,a\nnot,fine,at all\n")
    return [f"data.path={tmp / 'bad.csv'}"]


def _missing_column(tmp: Path, p) -> list:
    write_jsonl(tmp / "body.jsonl", [{"body": d} for d in make_corpus(30)])
    return [f"data.path={tmp / 'body.jsonl'}"]


def _missing_folder(tmp: Path, p) -> list:
    return [f"data.path={tmp / 'no-such-folder'}/"]


def _long_sequence(tmp: Path, p) -> list:
    return ["model=pretrained", f"model.name_or_path={p['gpt']}", f"data.path={p['corpus']}", "train.seq_len=4096"]


def _foreign_tokenizer(tmp: Path, p) -> list:
    from ftk.data.tokenizer import train_tokenizer
    from ftk.schemas import Family

    big = train_tokenizer(make_corpus(200), Family.gpt2, 2000, 128)
    big.save_pretrained(tmp / "big-tokenizer")
    return ["model=pretrained", f"model.name_or_path={p['gpt']}", f"model.tokenizer={tmp / 'big-tokenizer'}",
            f"data.path={p['corpus']}"]


def _finished_run(tmp: Path, p) -> list:
    return [f"hydra.run.dir={p['gpt'].parent}", f"data.path={p['corpus']}"]


def _not_a_model(tmp: Path, p) -> list:
    (tmp / "not-a-model").mkdir()
    return ["model=pretrained", f"model.name_or_path={tmp / 'not-a-model'}", f"data.path={p['corpus']}"]


CASES = [  # (case, pretrain overrides made in tmp_path, the one line says)
    ("empty dataset", _empty, "the dataset is empty"),
    ("malformed jsonl row", _malformed_jsonl, "bad.jsonl:3: malformed JSON"),
    ("malformed csv row", _malformed_csv, "bad.csv:3: 3 fields where the header has 2"),
    ("missing column", _missing_column, "has no column 'text'; its columns are body"),
    ("missing folder", _missing_folder, "does not exist"),
    ("sequence longer than the model's positions", _long_sequence, "larger than the model's 128 positions"),
    ("tokenizer of another vocabulary", _foreign_tokenizer, "they do not belong together"),
    ("output dir of a finished run", _finished_run, "holds a finished run"),
    ("model dir that is not a model", _not_a_model, "is not a model directory"),
]


@pytest.mark.parametrize("case,make,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(case, make, message, pretrained, tmp_path, capsys):
    finished = sorted(p.name for p in pretrained["gpt"].parent.rglob("*"))
    overrides = make(tmp_path, pretrained)
    run = [] if any(o.startswith("hydra.run.dir=") for o in overrides) else [f"hydra.run.dir={tmp_path / 'run'}"]
    code = ftk("pretrain", *TINY_GPT, "train.max_steps=2", *overrides, *run)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftk pretrain:")]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in pretrained["gpt"].parent.rglob("*")) == finished  # nothing touched


def test_full_disk_while_saving_keeps_the_previous_checkpoint(corpus_dir, tmp_path, monkeypatch, capsys):
    import ftk.checkpoint as checkpoint

    run = tmp_path / "run"
    args = [*TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=6", "train.save_every=2", "train.keep_last=1",
            f"hydra.run.dir={run}"]
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, path, *a, **k):  # the disk fills up during the second checkpoint
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    assert ftk("pretrain", *args) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("ftk pretrain:")]
    assert len(line) == 1 and "No space left on device" in line[0] and "previous checkpoint is intact" in line[0]
    (kept,) = checkpoint.step_dirs(run / "checkpoints")
    assert kept.name == "step-0000002" and not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert ftk("pretrain", *args, "train.resume=auto") == 0  # the space is back: the run continues


@pytest.mark.parametrize("mode,code", [("stop", 3), ("skip", 3)])
def test_non_finite_loss_stops_and_never_checkpoints_bad_weights(mode, code, corpus_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from ftk import checkpoint

    run = tmp_path / "run"
    # an absurd rate blows the weights up within a few steps
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", "train.lr=1e30", "train.warmup_steps=0",
               "train.max_grad_norm=0", "train.max_steps=30", "train.save_every=1", "train.log_every=1",
               f"train.on_nonfinite={mode}", "train.max_skipped_batches=2", f"hydra.run.dir={run}") == code
    err = capsys.readouterr().err
    expected = "non-finite" if mode == "stop" else "batches skipped for non-finite losses"
    assert expected in err and "Traceback" not in err and "train.lr" in err
    for saved in checkpoint.step_dirs(run / "checkpoints"):
        weights = load_file(str(saved / "model" / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), saved
    assert not (run / "final").exists()


def test_no_pickle_or_remote_code_on_user_paths():
    """Safe loading: torch.load only with weights_only=True, trust_remote_code off unless the user sets it."""
    import re

    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("ftk", "recipes", "cli") for p in (root / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle" not in text.replace("unpickle", ""), path
        assert "trust_remote_code=True" not in text, path
        assert "shell=True" not in text and "os.system(" not in text, path
    from ftk.schemas import ModelConfig

    assert ModelConfig.trust_remote_code is False
