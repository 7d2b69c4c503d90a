"""Distributed training on this CPU: 2 processes (gloo) give the losses of 1 process with the same global
batch, and only rank 0 writes; under DDP, and under FSDP (FSDP2 shards on a CPU mesh), whose checkpoints
resume exactly and whose final/ is a plain transformers checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import TINY_GPT, ftk

ARGS = [*TINY_GPT, "train.max_steps=6", "train.log_every=1", "train.eval_every=3", "hardware.num_threads=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), "-m", "ftk.cli.main", *args],
                          capture_output=True, text=True, timeout=600)


def one_and_two_processes(args, tmp_path):
    """The metrics histories of one command run in one process and, with torchrun, in two."""
    assert ftk(*args, f"hydra.run.dir={tmp_path / 'one'}") == 0
    done = torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}")
    assert done.returncode == 0, done.stderr[-3000:]
    return history(tmp_path / "one"), history(tmp_path / "two")


def history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(corpus_dir, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    assert ftk("pretrain", *ARGS, f"data.path={corpus_dir}", f"hydra.run.dir={single}") == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "ftk.cli.main", "pretrain", *ARGS,
                           f"data.path={corpus_dir}", f"hydra.run.dir={double}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["plan"]["world_size"] == 2 and summary["plan"]["strategy"] == "ddp"
    one, two = history(single), history(double)
    assert [r["step"] for r in one] == [r["step"] for r in two]  # one metrics.jsonl, written by rank 0 only
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert summary["tokens_seen"] == json.loads((single / "summary.json").read_text())["tokens_seen"]
    assert done.stderr.count("ftk pretrain:") == 0 and done.stdout.count("ftk pretrain:") <= 1


def test_two_processes_on_a_cold_cache_prepare_once_before_the_process_group(corpus_dir, tmp_path):
    """Both ranks start on an empty cache: the data is prepared once (by rank 0, which takes the lock first) while
    the other polls the lock; no collective runs meanwhile, and both then train on the same memory-mapped blocks."""
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "ftk.cli.main", "pretrain", *ARGS,
                           "train.max_steps=2", f"data.path={corpus_dir}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "FTK_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    entries = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not any(p.name.startswith(".tmp") for p in entries)
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["prepared_by"].endswith("rank 0")
    assert done.stderr.count("prepared in") == 1  # said once, by rank 0


FSDP = [*ARGS, "hardware.strategy=fsdp", "train.save_every=3", "train.keep_last=2"]


def test_fsdp_two_gloo_processes_match_one_process_resume_and_save_plain_hf(corpus_dir, tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    single, double, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    data = f"data.path={corpus_dir}"
    # One process with strategy=fsdp: nothing to shard, so it runs unsharded and says so.
    assert ftk("pretrain", *FSDP, data, f"hydra.run.dir={single}") == 0
    assert "nothing to shard, running unsharded" in capsys.readouterr().err
    assert json.loads((single / "summary.json").read_text())["plan"]["strategy"] == "none"

    done = torchrun("pretrain", *FSDP, data, f"hydra.run.dir={double}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["plan"]["world_size"] == 2 and summary["plan"]["strategy"] == "fsdp"
    # The mesh is the CPU's, said explicitly: fully_shard's default would be CUDA's on a GPU machine.
    assert json.loads((double / "environment.json").read_text())["device_mesh"] == "cpu x2"
    one, two = history(single), history(double)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # rank 0 writes alone
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)

    # The checkpoint's optimizer state was gathered from the shards: keyed by parameter name (only the FSDP
    # path writes names) and with every moment at the parameter's full shape, not a rank's half.
    full = AutoModelForCausalLM.from_pretrained(single / "final")
    shapes = {name: p.shape for name, p in full.named_parameters()}
    optim = torch.load(double / "checkpoints" / "step-0000003" / "optimizer.pt", weights_only=True)
    assert set(optim["state"]) == set(shapes)
    assert all(optim["state"][name]["exp_avg"].shape == shape for name, shape in shapes.items())

    # final/ is a plain Hugging Face checkpoint, the same tensors (and tied weights stored once) as 1 process.
    sharded = AutoModelForCausalLM.from_pretrained(double / "final")
    for (name, a), b in zip(full.state_dict().items(), sharded.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
    keys = [set(safe_open(str(run / "final" / "model.safetensors"), "pt").keys()) for run in (single, double)]
    assert keys[0] == keys[1]

    # Resume from the step-3 checkpoint, on 2 processes again: steps 4-6 repeat the uninterrupted run's losses.
    shutil.copytree(double, resumed)
    for leftover in ("final", "summary.json", "checkpoints/step-0000006"):
        shutil.rmtree(resumed / leftover) if (resumed / leftover).is_dir() else (resumed / leftover).unlink()
    again = torchrun("pretrain", *FSDP, data, "train.resume=auto", f"hydra.run.dir={resumed}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr + again.stdout
    assert [r["loss"] for r in history(resumed)] == pytest.approx([r["loss"] for r in two], rel=1e-6)


@pytest.mark.parametrize("override, env, message", [
    (["hardware.strategy=fsdp", "train.early_stopping_patience=2"], {},
     "train.early_stopping_patience is not supported with hardware.strategy=fsdp"),
    # (a hub name that is never fetched: the refusal comes first)
    (["hardware.strategy=fsdp", "regime=prompt_tuning", "model.name_or_path=ftk-test/never-loaded"], {},
     "regime=prompt_tuning does not work with"),
    # `accelerate launch --use_fsdp` without --fsdp_version 2 (FSDP1), whatever the profile says
    (["hardware.strategy=ddp"], {"ACCELERATE_USE_FSDP": "true"}, "add --fsdp_version 2"),
])
def test_fsdp_refusals_are_one_line_exit_2(override, env, message, corpus_dir, tmp_path, monkeypatch, capsys):
    # Two processes as far as the planner can tell; the refusal comes before any process group is needed.
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    command = "finetune" if any(o.startswith("regime=") for o in override) else "pretrain"
    code = ftk(command, *ARGS, *override, f"data.path={corpus_dir}",
               f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_lora_matches_one_process_and_saves_a_peft_adapter(pretrained, tmp_path):
    # FSDP2 shards frozen base weights and trainable LoRA weights side by side in the same blocks.
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    single, double = tmp_path / "one", tmp_path / "two"
    args = ["finetune", f"model.name_or_path={pretrained['gpt']}", "objective=clm", "regime=lora",
            f"data.path={pretrained['corpus']}", "hardware=cpu", "hardware.precision=fp32", "hardware.num_threads=1",
            "train.seq_len=64", "train.batch_size=8", "train.max_steps=4", "train.log_every=1", "train.eval_every=2",
            "train.eval_batches=4", "hardware.strategy=fsdp"]
    assert ftk(*args, f"hydra.run.dir={single}") == 0
    done = torchrun(*args, f"hydra.run.dir={double}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((double / "summary.json").read_text())["plan"]["strategy"] == "fsdp"
    for a, b in zip(history(single), history(double), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    one, two = (load_file(str(run / "final" / "adapter_model.safetensors")) for run in (single, double))
    assert one.keys() == two.keys()
    for key in one:  # Adam's first steps magnify float reordering in the tiny LoRA factors: compare loosely
        assert torch.allclose(one[key], two[key], atol=2e-3), key
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained["gpt"]), double / "final")


def test_fsdp_sigterm_to_one_process_checkpoints_both_at_the_same_step(corpus_dir, tmp_path):
    # A signal may reach one rank only (or a step earlier); saving is a collective, so the ranks must agree.
    import contextlib
    import os
    import signal
    import time

    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_port()), "-m", "ftk.cli.main", "pretrain", *ARGS,
                                 "hardware.strategy=fsdp", "train.max_steps=100000", "train.eval_every=0",
                                 f"data.path={corpus_dir}", f"hydra.run.dir={run}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len((run / "metrics.jsonl").read_text().splitlines()
                                             if (run / "metrics.jsonl").exists() else []) < 3:
            time.sleep(0.5)
        workers = [int(pid) for pid in subprocess.run(["pgrep", "-f", f"hydra.run.dir={run}"], capture_output=True,
                                                      text=True).stdout.split()
                   if b"torch.distributed.run" not in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGTERM)  # one worker only
        _, err = launcher.communicate(timeout=120)  # before the fix, the other rank waited forever
    finally:
        launcher.kill()
        for pid in workers:  # a hung worker outlives its launcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "stopped by SIGTERM" in err
    step = history(run)[-1]["step"]
    assert (run / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").is_file()


def test_length_grouped_classification_on_two_processes_matches_one(pretrained, tmp_path):
    # 480 labelled examples of varying length at a global batch of 8: enough for length-grouped batches,
    # whose groups are global batches, so 2 processes x 4 read the same examples per step as 1 x 8.
    from tests.conftest import make_labelled, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", make_labelled(480, seed=1))
    args = ["finetune", f"model.name_or_path={pretrained['gpt']}", "regime=full", "hardware=cpu",
            "hardware.precision=fp32", "hardware.num_threads=1", "train.batch_size=8", "train.seq_len=64",
            "train.max_steps=4", "train.log_every=1", "train.eval_every=4", "train.save_every=0",
            f"data.path={train}"]
    one, two = one_and_two_processes(args, tmp_path)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["tokens"] == a["tokens"]
