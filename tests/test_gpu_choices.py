"""Smaller GPU-path choices, checked on this CPU: where QLoRA's base goes under hardware=cpu, what FSDP refuses,
that L2-SP's anchors follow the model once, and that hardware=auto says when it falls back to the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_GPT, ftk, make_labelled, write_jsonl


def test_qlora_with_hardware_cpu_stays_on_the_cpu_on_a_gpu_machine(pretrained, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    # A GPU machine as far as the loader can tell. Before the fix QLoRA's base went to cuda:0 whatever the
    # plan said (here: a failure, since there is no CUDA to put it on).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(48, seed=1))
    assert ftk("finetune", f"model.name_or_path={pretrained['gpt']}", "regime=qlora", "hardware=cpu",
               "hardware.precision=bf16", "train.batch_size=8", "train.seq_len=64", "train.max_steps=1",
               "train.save_every=0", f"data.path={train}", f"hydra.run.dir={tmp_path / 'run'}") == 0


def test_adamw_8bit_with_fsdp_is_refused(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes as far as the planner can tell; refused before any
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    code = ftk("pretrain", *TINY_GPT, "hardware.strategy=fsdp", "hardware.optimizer=adamw_8bit",
               "hardware.check_memory=false", f"data.path={corpus_dir}", f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert code == 2 and "adamw_8bit does not work with hardware.strategy=fsdp" in err and "Traceback" not in err


def test_l2sp_moves_its_anchors_to_the_model_once():
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftk.forgetting import L2SP

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    penalty = L2SP(model, 1.0, [])
    model.to("meta")  # stands for the GPU that accelerate moves the model to after the anchors were taken
    penalty(model, 0)
    # Before the fix every step copied every anchor host -> device again, and kept none there.
    assert {a.device.type for a in penalty.anchors.values()} == {"meta"}


def test_auto_says_when_it_trains_on_the_cpu(corpus_dir, tmp_path, capsys):
    assert ftk("pretrain", *TINY_GPT, "hardware=auto", "hardware.precision=fp32", "train.max_steps=1",
               "train.save_every=0", f"data.path={corpus_dir}", f"hydra.run.dir={tmp_path / 'run'}") == 0
    assert "hardware=auto: no CUDA device visible to torch, training on the CPU" in capsys.readouterr().err
