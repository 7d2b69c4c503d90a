"""fp16 with train.on_nonfinite=skip: a skipped step must leave torch's GradScaler ready for the next one.

accelerate creates the scaler only on CUDA; this runs the real loop on the CPU with a real
`torch.amp.GradScaler("cpu")` handed to accelerate before `prepare`, which is all the fp16 path differs by."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ftk.hardware import Plan


class PoisonedLM:
    """Causal LM whose loss is NaN on the `bad`-th training forward (a fp16 overflow, deterministically)."""

    def __init__(self, bad: int):
        from ftk.objectives.clm import CausalLM

        self.inner, self.bad, self.calls = CausalLM(), bad, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, inputs):
        loss_sum, count = self.inner.loss(model, inputs)
        if model.training:
            self.calls += 1
            if self.calls == self.bad:
                loss_sum = loss_sum * float("nan")
        return loss_sum, count


def test_fp16_skip_keeps_training_with_a_grad_scaler(tmp_path):
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftk import schemas, train

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    rng = np.random.default_rng(0)
    source = train.BlockSource(rng.integers(0, 64, (64, 16)), rng.integers(0, 64, (8, 16)))
    cfg = OmegaConf.merge(OmegaConf.structured(schemas.TrainConfig),
                          {"max_steps": 5, "batch_size": 4, "log_every": 1, "eval_every": 0, "eval_batches": 1,
                           "save_every": 0, "on_nonfinite": "skip", "lr": 1e-3, "warmup_steps": 0})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests in this process set another precision
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")  # CPU autocast to float16
    # What Accelerator sets up on CUDA for fp16: native AMP with a GradScaler (on the CPU it leaves both off).
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    plan = Plan("cpu", "fp16", 1, 4, 1, "adamw", False, "none")
    # Before the fix, step 3 raised "unscale_() has already been called on this optimizer since the last update()".
    result = train.run(model=model, tokenizer=None, objective=PoisonedLM(bad=2), source=source, train_cfg=cfg,
                       plan=plan, accelerator=accelerator, run_dir=tmp_path)
    assert result.state.step == 5 and result.state.skipped_batches == 1
    assert [math.isfinite(r["loss"]) for r in result.history] == [True] * 5  # the skipped step logs no NaN
    assert accelerator.scaler.get_scale() == pytest.approx(2.0 ** 9)  # lowered once, as for an overflow
