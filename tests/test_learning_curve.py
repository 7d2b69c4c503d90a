"""What a pretrained-vs-scratch learning curve needs from `ftk finetune`: a seeded, class-stratified label
budget (data.train_examples), a test set scored once after training (data.test_path), and the same
architecture from random initialisation (model.random_init)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ftk.data.labelled import stratified_sample
from tests.conftest import make_labelled, write_jsonl
from tests.test_finetune import finetune, summary, weights


def test_stratified_sample_keeps_shares_is_seeded_and_nested():
    records = [(f"t{i}", "big") for i in range(60)] + [(f"u{i}", "mid") for i in range(30)] + \
              [(f"v{i}", "rare") for i in range(10)]
    small = stratified_sample(records, 10, seed=3)
    assert Counter(label for _, label in small) == {"big": 6, "mid": 3, "rare": 1}
    assert stratified_sample(records, 10, seed=3) == small
    assert stratified_sample(records, 10, seed=4) != small
    larger = stratified_sample(records, 40, seed=3)
    assert Counter(label for _, label in larger) == {"big": 24, "mid": 12, "rare": 4}
    assert set(small) <= set(larger)  # a learning curve adds data; it does not redraw it
    # fewer records than classes' shares allow: every class still gets one, the total is exact
    tiny = stratified_sample(records, 3, seed=0)
    assert sorted(label for _, label in tiny) == ["big", "mid", "rare"]
    assert len(stratified_sample(records, 100, seed=0)) == 100


def test_label_budget_and_test_set_through_the_cli(pretrained, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(90, seed=1))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_labelled(30, seed=2))
    run = finetune(tmp_path, pretrained["gpt"], "regime=lora", "train.max_steps=6", f"data.path={train}",
                   f"data.validation_path={dev}", f"data.test_path={dev}", "data.train_examples=12")
    s = summary(run)
    assert s["train_examples"] == 12 and s["test_examples"] == 30
    # the test set here is the validation file: scored by the same final model it must agree exactly
    assert s["test_accuracy"] == pytest.approx(s["final_eval_accuracy"])
    assert s["test_loss"] == pytest.approx(s["final_eval_loss"], rel=1e-5)
    assert "12 of 90 training records" in s["data"]


def test_random_init_keeps_the_architecture_and_draws_fresh_seeded_weights(pretrained, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(48, seed=1))
    args = ["regime=feature_extraction", "train.max_steps=2", f"data.path={train}", "model.random_init=true"]
    first = finetune(tmp_path, pretrained["gpt"], *args, name="a")
    again = finetune(tmp_path, pretrained["gpt"], *args, name="b")
    other = finetune(tmp_path, pretrained["gpt"], *args, "train.seed=1", name="c")
    base, a, b, c = (weights(p) for p in (pretrained["gpt"], first / "final", again / "final", other / "final"))
    body = [k for k in a if k in base and ("wte" in k or "h.0.attn" in k)]
    assert body and all(a[k].shape == base[k].shape for k in body)
    assert not any(torch.equal(a[k], base[k]) for k in body)   # nothing pretrained survives
    assert all(torch.equal(a[k], b[k]) for k in body)          # the same seed draws the same weights
    assert not all(torch.equal(a[k], c[k]) for k in body)      # another seed, other weights
    assert summary(first)["init"] == "random"
