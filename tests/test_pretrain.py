"""End-to-end pretraining of tiny models on tiny data: learning, saving, reloading, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_BERT, TINY_GPT, ftk


def metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def validation_loss(model, blocks: np.ndarray, objective) -> float:
    from ftk.train import step_seed

    total, count = 0.0, 0
    with torch.no_grad():
        for i, start in enumerate(range(0, len(blocks), 8)):
            batch = torch.from_numpy(np.asarray(blocks[start:start + 8], dtype=np.int64))
            inputs = objective.inputs(batch, torch.Generator().manual_seed(step_seed(0, i, 0, stream=1)))
            s, c = objective.loss(model, inputs)
            total, count = total + s.item(), count + c.item()
    return total / count


@pytest.mark.parametrize("family,args,auto", [
    ("gpt", TINY_GPT, "AutoModelForCausalLM"),
    ("bert", TINY_BERT, "AutoModelForMaskedLM"),
])
def test_pretrain_learns_saves_and_reloads_in_plain_transformers(family, args, auto, corpus_dir, tmp_path):
    import transformers

    run = tmp_path / "run"
    assert ftk("pretrain", *args, f"data.path={corpus_dir}", "train.max_steps=60", "train.eval_every=20",
               "train.save_every=30", f"hydra.run.dir={run}") == 0

    lines = metrics(run)
    evals = [r["eval_loss"] for r in lines if "eval_loss" in r]
    assert len(evals) == 3
    # An untrained model scores about ln(vocab) = 6.24 nats; learning the templates must take 2 nats off.
    assert evals[-1] < math.log(512) - 2.0, evals
    assert evals[0] > evals[1] > evals[2]
    assert all(math.isfinite(r["loss"]) for r in lines if "loss" in r)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["tokens_seen"] == 60 * 8 * 64
    for name in (".hydra/config.yaml", "environment.json", "final/config.json", "final/model.safetensors",
                 "final/tokenizer.json"):
        assert (run / name).is_file(), name
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000030", "step-0000060"]

    # Plain transformers, no ftk code: the reloaded model scores the validation data exactly as the
    # training loop did at its final evaluation.
    model = getattr(transformers, auto).from_pretrained(run / "final").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "final")
    from ftk.data import lm
    from ftk.objectives import get_objective
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    from ftk.data import prepare, stream
    from ftk.data.tokenizer import tokenizer_fingerprint

    corpus = stream.resolve(cfg.data, cfg.train.seed)
    packed = prepare.prepare(corpus, tokenizer, tokenizer_fingerprint(tokenizer), 64, cfg.objective.name,
                             lm.cache_root(None)).packed
    assert packed.cache_hit  # the same tokenizer finds the blocks the run cached
    loss = validation_loss(model, packed.validation[:32], get_objective(cfg.objective, tokenizer))
    assert loss == pytest.approx(summary["final_eval_loss"], rel=1e-5)

    text = "the time of the world was good ."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if family == "gpt":  # byte-level BPE round-trips text exactly
        assert tokenizer.decode(ids) == text
    else:  # WordPiece normalises spacing around punctuation, but the ids survive a round trip
        assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_same_config_same_losses(corpus_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=10", "train.log_every=1",
                   "model.dropout=0.1", f"hydra.run.dir={tmp_path / name}") == 0
        runs.append([r["loss"] for r in metrics(tmp_path / name) if "loss" in r])
    assert runs[0] == runs[1] and len(runs[0]) == 10
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same final weights, bit for bit
    env = json.loads((tmp_path / "a" / "environment.json").read_text())
    assert all(env["packages"][p] for p in ("torch", "transformers", "ftk")) and "ftk_git_commit" in env


def test_second_run_reuses_tokenized_data(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTK_CACHE", str(tmp_path / "fresh-cache"))
    for name in ("a", "b"):
        assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=2",
                   f"hydra.run.dir={tmp_path / name}") == 0
    err = capsys.readouterr().err
    assert err.count("(from cache)") == 1 and "cached gpt2 tokenizer" in err


def test_finished_run_is_never_overwritten(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=2", f"hydra.run.dir={run}") == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", "train.max_steps=3", f"hydra.run.dir={run}") == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_multirun_one_run_per_model(corpus_dir, tmp_path):
    sweep = tmp_path / "sweep"
    assert ftk("pretrain", "-m", *TINY_GPT, "model=gpt-tiny,llama-tiny", f"data.path={corpus_dir}",
               "train.max_steps=3", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}") == 0
    for num, model_type in (("0", "gpt2"), ("1", "llama")):
        config = json.loads((sweep / num / "final" / "config.json").read_text())
        assert config["model_type"] == model_type
