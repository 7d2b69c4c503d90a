"""Planned vs measured peak memory of real training steps on this CPU (ftk.planner against the process).

Each case runs in a fresh process: build the model from ftk's model options, apply the regime with ftk's
own code (ftk.regimes, ftk.regimes.qlora_base), wrap it with accelerate as `ftk.session` does, build
ftk's optimizer, and take a few optimizer steps on a fixed batch (the loss is ftk's causal-LM or
masked-LM objective, gradients clipped like ftk.train). The peak resident size above the level before
the model was built is measured both by ftk.peak_memory.PeakMemory (sampled) and the kernel's
high-water mark (ru_maxrss), the larger is kept, and compared with the planner's figure without its
fixed overhead (Estimate.tensors). The process calls ftk.cpu_heap.release_freed_cpu_memory() first, as
the planner assumes; `--glibc-default` measures without it.

    python scripts/measure_memory.py                      # every case, a markdown table
    python scripts/measure_memory.py --case gpt-small-fp32 --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

# name -> (model options, regime, precision, optimizer, micro-batch, seq_len, gradient checkpointing, objective)
GPT_TINY = dict(family="gpt2", hidden_size=256, num_layers=4, num_heads=4, vocab_size=8192, max_position_embeddings=512)
GPT_SMALL = dict(family="gpt2", hidden_size=512, num_layers=8, num_heads=8, vocab_size=8192, max_position_embeddings=512)
LLAMA_TINY = dict(family="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688,
                  vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False)
BERT_TINY = dict(family="bert", hidden_size=256, num_layers=4, num_heads=4, vocab_size=8192, max_position_embeddings=512)
# Llama 3's vocabulary on a small Llama body: the logits of 4 x 1,024 tokens (2 GiB in float32) outweigh the model.
LLAMA_128K = dict(family="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688,
                  vocab_size=128256, max_position_embeddings=1024, tie_word_embeddings=False)
CASES: Dict[str, Dict[str, Any]] = {
    "gpt-tiny-fp32": dict(model=GPT_TINY, regime="full", precision="fp32", optimizer="adamw_fused", micro=8, seq=256),
    "gpt-small-fp32": dict(model=GPT_SMALL, regime="full", precision="fp32", optimizer="adamw_fused", micro=8, seq=256),
    "gpt-small-foreach": dict(model=GPT_SMALL, regime="full", precision="fp32", optimizer="adamw", micro=8, seq=256),
    "gpt-small-bf16": dict(model=GPT_SMALL, regime="full", precision="bf16", optimizer="adamw_fused", micro=8, seq=256),
    "gpt-small-ckpt": dict(model=GPT_SMALL, regime="full", precision="fp32", optimizer="adamw_fused", micro=8, seq=256,
                           checkpointing=True),
    "gpt-small-lora": dict(model=GPT_SMALL, regime="lora", precision="fp32", optimizer="adamw_fused", micro=8, seq=256),
    "gpt-small-qlora": dict(model=GPT_SMALL, regime="qlora", precision="bf16", optimizer="adamw_fused", micro=8,
                            seq=256),
    "llama-tiny-fp32": dict(model=LLAMA_TINY, regime="full", precision="fp32", optimizer="adamw_fused", micro=8, seq=256),
    "bert-tiny-mlm": dict(model=BERT_TINY, regime="full", precision="fp32", optimizer="adamw_fused", micro=8, seq=256,
                          objective="mlm"),
    # the fused head and loss (ftk.objectives.linear_cross_entropy) against the model's full logits ("plain")
    "llama-128k-bf16": dict(model=LLAMA_128K, regime="full", precision="bf16", optimizer="adamw_fused", micro=4,
                            seq=1024),
    "llama-128k-bf16-plain": dict(model=LLAMA_128K, regime="full", precision="bf16", optimizer="adamw_fused", micro=4,
                                  seq=1024, head="plain"),
}


def plan(case: Dict[str, Any]):
    from omegaconf import OmegaConf

    from ftk import planner
    from ftk.schemas import ModelConfig

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name_or_path": None, **case["model"]})
    shape = planner.shape_from_model_options(m, "measured")
    setup = planner.Setup(regime=case["regime"], objective=case.get("objective", "clm"), precision=case["precision"],
                         optimizer=case["optimizer"], micro_batch_size=case["micro"], seq_len=case["seq"],
                         gradient_checkpointing=bool(case.get("checkpointing")), device="cpu",
                         batch_size=case["micro"], fused_head=case.get("head") != "plain")
    return planner.estimate(shape, setup)


def measure(case: Dict[str, Any], steps: int, release: bool) -> Dict[str, Any]:
    """Run `steps` optimizer steps of `case` in this process; returns the measured peak increase."""
    import gc
    import resource
    import tempfile

    from ftk import cpu_heap

    if release:
        cpu_heap.release_freed_cpu_memory()
    import torch

    torch.set_num_threads(1)  # modest: other jobs share this machine; the peak does not depend on it
    import transformers
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from omegaconf import OmegaConf

    from ftk.models import build_model
    from ftk.objectives.clm import CausalLM
    from ftk.objectives.mlm import MaskedLM
    from ftk.objectives.table import MlmSettings
    from ftk.optim import build_optimizer
    from ftk.peak_memory import PeakMemory, rss_bytes
    from ftk.schemas import ModelConfig, Objective

    transformers.logging.set_verbosity_error()
    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name_or_path": None, **case["model"]})
    objective_name = case.get("objective", "clm")
    train_cfg = OmegaConf.create(dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1))

    class Tok:  # what build_config and MaskedLM read from a tokenizer
        bos_token_id, eos_token_id, pad_token_id, mask_token_id = 1, 2, 0, 3
        all_special_ids = [0, 1, 2, 3]

        def __len__(self):
            return m.vocab_size

    tok = Tok()
    if case.get("head") == "plain":  # the loss from the model's full logits, as before the fused head
        from ftk.objectives import linear_cross_entropy

        linear_cross_entropy.output_head = lambda model: None
    objective = CausalLM() if objective_name == "clm" else MaskedLM(MlmSettings(), tok)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True, mixed_precision={"fp32": "no", "bf16": "bf16"}[case["precision"]])

    def steps_of(model, optimizer, n: int, batch) -> None:
        for step in range(n):
            inputs = objective.inputs(batch, torch.Generator().manual_seed(step))
            loss_sum, count = objective.loss(model, inputs)
            accelerator.backward(loss_sum / count)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # Warm up: import every module and touch every kernel once on a tiny copy, so the measurement below
    # sees tensors, not code being loaded.
    small = OmegaConf.merge(m, {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": None,
                                "intermediate_size": None})
    warm = build_model(small, Objective(objective_name), tok)
    warm_opt = build_optimizer(warm, train_cfg, case["optimizer"], "cpu")
    warm, warm_opt = accelerator.prepare(warm, warm_opt)
    steps_of(warm, warm_opt, 2, torch.randint(4, m.vocab_size, (2, 16)))
    del warm, warm_opt
    gc.collect()

    with tempfile.TemporaryDirectory() as tmp:
        if case["regime"] == "qlora":  # QLoRA loads a saved checkpoint in 4 bits: save one first (not measured)
            build_model(m, Objective(objective_name), tok).save_pretrained(tmp)
            gc.collect()
        batch = torch.randint(4, m.vocab_size, (case["micro"], case["seq"]), generator=torch.Generator().manual_seed(0))
        # The kernel's high-water mark from here on only: reset it (Linux: clear_refs 5), so that what imports
        # and the warm-up touched before `start` (then trimmed away) is not counted as the run's.
        reset = _reset_high_water()
        start = rss_bytes()
        with PeakMemory("cpu", interval=0.005) as peak:
            model = _model(case, m, objective_name, tok, tmp)
            optimizer = build_optimizer(model, train_cfg, case["optimizer"], "cpu")
            model, optimizer = accelerator.prepare(model, optimizer)
            model.train()
            steps_of(model, optimizer, steps, batch)
        high_water = (_high_water() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - start
    return {"sampled": peak.added, "high_water": high_water, "measured": max(peak.added, high_water)}


def _model(case, m, objective_name, tok, checkpoint_dir):
    from ftk.models import build_model
    from ftk.regimes import Context
    from ftk.regimes.table import settings_of
    from ftk.schemas import Objective

    objective = Objective(objective_name)
    regime = case["regime"]
    settings = settings_of(regime if regime in ("lora", "qlora") else "full")
    if regime == "qlora":
        import torch
        from transformers import AutoModelForCausalLM

        from ftk.regimes.qlora_base import load_4bit_base

        model = load_4bit_base(checkpoint_dir, AutoModelForCausalLM, torch.bfloat16)
    else:
        model = build_model(m, objective, tok)
    if case.get("checkpointing"):
        model.gradient_checkpointing_enable()
    if regime in ("lora", "qlora"):
        from ftk.regimes import lora

        model = lora.apply(model, Context(settings, objective, [])).model
    return model


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water() > 0
    except OSError:
        return False


def _high_water() -> int:
    """VmHWM of /proc/self/status in bytes (0 when unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(name: str, steps: int = 3, release: bool = True) -> Dict[str, Any]:
    """Measure one case in a fresh process; returns planned and measured bytes."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--json", "--steps", str(steps)]
    if not release:
        cmd.append("--glibc-default")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="run the case here and print one JSON line")
    parser.add_argument("--glibc-default", action="store_true", help="do not call release_freed_cpu_memory()")
    args = parser.parse_args(argv)
    names = args.case or list(CASES)
    if args.json:
        case = CASES[names[0]]
        estimate = plan(case)
        result = measure(case, args.steps, not args.glibc_default)
        result.update(case=names[0], planned=estimate.tensors, weights=estimate.weights, gradients=estimate.gradients,
                      optimizer=estimate.optimizer, activations=estimate.activations, logits=estimate.logits,
                      parameters=estimate.parameters, trainable=estimate.trainable)
        print(json.dumps(result))
        return 0
    print("| case | parameters | planned | measured | planned / measured |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        r = run_case(name, args.steps, not args.glibc_default)
        print(f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['planned'] / 2**20:,.0f} MiB | "
              f"{r['measured'] / 2**20:,.0f} MiB | {r['planned'] / r['measured']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
