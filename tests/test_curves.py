"""curves.png in every run (continuous over a resume, never failing the run) and `ftk plot` overlaying runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_GPT, ftk

ARGS = (*TINY_GPT, "train.eval_every=5", "train.save_every=5", "data.max_documents=300")


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _image(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.imread(path)


def test_a_resumed_run_draws_one_continuous_curve(corpus_dir, tmp_path):
    from ftk import curves

    run = tmp_path / "run"
    assert ftk("pretrain", *ARGS, f"data.path={corpus_dir}", "train.max_steps=10", f"hydra.run.dir={run}") == 0
    first = (run / "curves.png").stat().st_mtime_ns
    assert ftk("pretrain", *ARGS, f"data.path={corpus_dir}", "train.max_steps=20", "train.resume=auto",
               f"hydra.run.dir={run}") == 0
    assert (run / "curves.png").stat().st_mtime_ns > first  # drawn again, from the whole file
    records = curves.read_metrics(run)
    for key in ("loss", "eval_loss", "lr", "tokens_per_s"):
        steps, values = curves.series(records, key)
        assert steps == [5, 10, 15, 20], key  # no gap and no step twice across the resume
        assert all(v == v for v in values)
    assert _image(run / "curves.png").shape[:2] == (650, 1000)


def test_a_failure_to_draw_never_fails_the_run(corpus_dir, tmp_path, monkeypatch, capsys):
    from ftk import curves

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(curves, "draw", broken)
    run = tmp_path / "run"
    assert ftk("pretrain", *ARGS, f"data.path={corpus_dir}", "train.max_steps=5", f"hydra.run.dir={run}") == 0
    assert (run / "final" / "model.safetensors").is_file() and not (run / "curves.png").exists()
    assert "curves.png not drawn: OSError: disk full" in capsys.readouterr().err


def test_ftk_plot_overlays_runs_and_sweep_folders(pretrained, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    for name, steps in (("0_regime=full", [5, 10]), ("1_regime=lora", [5, 10, 15])):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-4, "tokens_per_s": 100.0}) + "\n" for s in steps)
            + json.dumps({"step": steps[-1], "eval_loss": 2.0, "eval_accuracy": 0.5}) + "\n" + '{"step": 1')  # cut line
    assert ftk("plot", str(sweep)) == 0
    assert _image(sweep / "curves.png").shape[:2] == (650, 1000)
    assert "2 runs: 0_regime=full, 1_regime=lora" in capsys.readouterr().err

    out = tmp_path / "both.svg"
    assert ftk("plot", str(pretrained["gpt"].parent), str(sweep / "0_regime=full"), "-o", str(out)) == 0
    assert out.read_text().lstrip().startswith("<?xml")
    assert "(2 runs: gpt, 0_regime=full)" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    assert ftk("plot", str(tmp_path / "nothing-here")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist; pass ftk run folders" in err[0]
    assert ftk("plot", str(pretrained["gpt"].parent), "-o", "out.txt") == 2
    assert "pick a .png, .pdf or .svg" in capsys.readouterr().err
