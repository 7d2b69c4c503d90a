"""torch.compile is on by default for CUDA runs of 300+ steps; on this CPU `hardware.compile=true` with the eager
backend wraps the model exactly as on a GPU (accelerate's prepare returns an OptimizedModule whose parameter
names start with `_orig_mod.`) without generating code. A compiled run must train what the uncompiled run
trains: the same losses, the same saved weights."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_finetune import FAST, summary, weights
from tests.conftest import ftk

COMPILED = ["hardware.compile=true", "hardware.compile_backend=eager"]


def history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def task(tmp_path):
    from tests.conftest import make_labelled, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(96, seed=1))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_labelled(30, seed=2))
    return [f"data.path={train}", f"data.validation_path={dev}"]


def pair(tmp_path, base, *args):
    """The same fine-tune without and with compile; returns both run directories."""
    runs = []
    for name, extra in (("plain", []), ("compiled", COMPILED)):
        run = tmp_path / name
        assert ftk("finetune", f"model.name_or_path={base}", *FAST, *args, *extra, f"hydra.run.dir={run}") == 0
        runs.append(run)
    assert summary(runs[1])["plan"]["compile"] is True
    return runs


def same_training(plain, compiled):
    for a, b in zip(history(plain), history(compiled), strict=True):
        assert b.get("loss") == pytest.approx(a.get("loss"), rel=1e-4), (a, b)
    one, two = weights(plain / "final"), weights(compiled / "final")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-4), key


def test_gradual_unfreeze_unfreezes_the_compiled_model(pretrained, task, tmp_path):
    # Before the fix: every parameter frozen (the schedule's names lack `_orig_mod.`), then a crash at step 4.
    plain, compiled = pair(tmp_path, pretrained["gpt"], "regime=gradual_unfreeze", "regime.unfreeze_every=4",
                           "train.max_steps=12", *task)
    same_training(plain, compiled)
    s = summary(compiled)
    assert s["trainable_parameters_end"] > s["trainable_parameters"]


def test_l2sp_pulls_the_compiled_model_towards_its_anchor(pretrained, task, tmp_path):
    # Before the fix: L2-SP matched no parameter name and silently added nothing.
    plain, compiled = pair(tmp_path, pretrained["gpt"], "regime=full", "train.lr=3e-3", "train.max_steps=6",
                           "forgetting.l2sp=50.0", *task)
    same_training(plain, compiled)


def test_early_stopping_restores_the_best_compiled_model(pretrained, task, tmp_path):
    # Before the fix: best/ could not be loaded back into the wrapper, and a full model wrote no final/.
    plain, compiled = pair(tmp_path, pretrained["gpt"], "regime=full", "train.lr=5e-2", "train.max_steps=40",
                           "train.eval_every=2", "train.early_stopping_patience=2", *task)
    s = summary(compiled)
    assert s["stopped_early"] and s["best_step"] < s["steps"]
    same_training(plain, compiled)
    best, final = weights(compiled / "best"), weights(compiled / "final")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)


def test_lora_early_stopping_keeps_the_best_adapter_when_compiled(pretrained, task, tmp_path):
    # Adapters used to keep the last step's weights while summary.json named the best step.
    from safetensors.torch import load_file

    plain, compiled = pair(tmp_path, pretrained["gpt"], "regime=lora", "train.lr=5e-1", "train.max_steps=40",
                           "train.eval_every=2", "train.early_stopping_patience=2", *task)
    s = summary(compiled)
    assert s["stopped_early"] and s["best_step"] < s["steps"]
    best = load_file(str(compiled / "best" / "adapter_model.safetensors"))
    final = load_file(str(compiled / "final" / "adapter_model.safetensors"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)


def test_variable_lengths_compile_once_more_not_once_per_length(pretrained, task, tmp_path):
    """Classification batches are padded to their longest example, so lengths vary step to step; the compiled
    model is traced as dynamic after the first new length (issue 16 finding 11): a few graphs in all, not one
    per length (which would also hit dynamo's cache limit and fall back to eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = tmp_path / "compiled"
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", *FAST, *COMPILED, "regime=full",
               "train.max_steps=8", "train.eval_every=0", *task, f"hydra.run.dir={run}") == 0
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, dict(counters["stats"])  # the first length, then dynamic (x2 with a graph break)
