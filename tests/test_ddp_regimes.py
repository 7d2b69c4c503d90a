"""DDP on 2 gloo processes with what the CPU tests used to miss: regimes that unfreeze after the model is wrapped,
and validation on models with buffers when there are fewer validation batches than processes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import ftk, make_labelled, write_jsonl
from tests.test_distributed import history, one_and_two_processes
from tests.test_finetune import weights

BASE = ["hardware=cpu", "hardware.precision=fp32", "hardware.num_threads=1", "train.batch_size=8", "train.seq_len=64",
        "train.log_every=1", "train.save_every=0", "train.warmup_steps=0", "train.lr=1e-2"]


@pytest.mark.parametrize("regime", [["regime=gradual_unfreeze", "regime.unfreeze_every=2"],
                                    ["regime=head_then_full", "regime.head_steps=2"]])
def test_layers_unfrozen_after_wrapping_are_averaged_over_processes(regime, pretrained, tmp_path):
    # Before the fix the blocks unfrozen at step 2 trained on each rank's own half of the batch: the 2-process
    # losses left the 1-process ones and rank 0 saved weights no other rank had.
    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(96, seed=1))
    args = ["finetune", f"model.name_or_path={pretrained['gpt']}", *BASE, *regime, "train.max_steps=6",
            "train.eval_every=6", f"data.path={train}"]
    one, two = one_and_two_processes(args, tmp_path)
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    single, double = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    # Adam turns float-reordering noise in near-zero gradients (GPT-2's key biases get none in theory) into
    # updates of ~1e-4; unsynchronised replicas differ by ~1e-2 (the learning rate) in every trained tensor.
    for key in single:
        assert torch.allclose(single[key], double[key], atol=2e-3), key


def _torchrun_within(seconds, *args):
    """torchrun, killed (with its workers) if it has not finished in `seconds`: a hang fails the test."""
    import os
    import signal
    import subprocess
    import sys

    from tests.test_distributed import free_port

    run_dir = next(a for a in args if a.startswith("hydra.run.dir="))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_port()), "-m", "ftk.cli.main", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = launcher.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        # The workers run in sessions of their own: find them by their unique run directory.
        pids = subprocess.run(["pgrep", "-f", run_dir], capture_output=True, text=True).stdout.split()
        for pid in [launcher.pid, *map(int, pids)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.communicate()
        pytest.fail(f"2-process run still running after {seconds}s (hung)")
    return launcher.returncode, err


TINY_LLAMA = ["model=llama-tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
              "model.num_kv_heads=1", "model.intermediate_size=128", "model.vocab_size=512",
              "model.max_position_embeddings=128"]


@pytest.mark.parametrize("model", [TINY_LLAMA, ["model=bert-tiny", "objective=mlm", "model.hidden_size=64",
                                                "model.num_layers=2", "model.num_heads=2", "model.vocab_size=512",
                                                "model.max_position_embeddings=128"]], ids=["llama", "bert"])
def test_validation_with_fewer_batches_than_processes_does_not_hang(model, corpus_dir, tmp_path):
    # One validation batch for two processes, on models with buffers (Llama's rotary frequencies, BERT's
    # position ids): before the fix rank 0's first validation forward waited in DDP's buffer broadcast, which
    # rank 1, with no batch, never joined.
    run = tmp_path / "run"
    code, err = _torchrun_within(float(os.environ.get("FTK_TEST_HANG_S", 240)), "pretrain", *model, *BASE, "train.max_steps=2", "train.eval_every=1",
                                 "train.eval_batches=1", f"data.path={corpus_dir}", f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    assert [r["step"] for r in history(run) if "eval_loss" in r] == [1, 2]


def test_compiled_ddp_matches_one_process_and_takes_the_collective_timeout(corpus_dir, tmp_path):
    # torch.compile over DDP (the default on GPUs for 300+ steps) trains as one process does; and the process
    # group is created with hardware.timeout_minutes rather than the backend's default.
    args = ["pretrain", *TINY_LLAMA, *BASE, "train.max_steps=4", "train.eval_every=4", "train.eval_batches=2",
            "hardware.compile=true", "hardware.compile_backend=eager", f"data.path={corpus_dir}"]
    assert ftk(*args, f"hydra.run.dir={tmp_path / 'one'}") == 0
    code, err = _torchrun_within(300, *args, "hardware.timeout_minutes=7", f"hydra.run.dir={tmp_path / 'two'}")
    assert code == 0, err[-3000:]
    # hardware.timeout_minutes reached the process group (NCCL's default would be 10 minutes, gloo's 30)
    assert json.loads((tmp_path / "two" / "environment.json").read_text())["collective_timeout_s"] == 420
    for a, b in zip(history(tmp_path / "one"), history(tmp_path / "two"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
