#!/usr/bin/env python
"""How training throughput scales with model size, on paper: FLOPs per token against a device's peak.

    python scripts/throughput_on_paper.py                     # GPT-2 shapes from gpt-tiny to GPT-2 XL
    python scripts/throughput_on_paper.py --cpu-mfu 0.69 --gpu-mfu 0.40

tokens/s = MFU x peak FLOP/s / (model FLOPs per token), with model FLOPs per token = 6N + 12 L d S
(PaLM, App. B; N = matmul weights, the tied LM head included), the formula scripts/bench_throughput.py
measures MFU with. The CPU column uses this machine's measured bf16 peak and MFU (bench_throughput.py
prints both); the GPU columns use the vendors' dense bf16 peaks and an assumed MFU: well-tuned training
of billion-parameter models reaches 35-50% on A100/H100; small models reach much less on a GPU (kernel
launches and memory traffic dominate), so read the small rows' GPU figures as upper bounds.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Tuple

from bench_throughput import Shape, flops_per_token, parameter_count  # scripts/ is on sys.path

# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), in TFLOP/s.
GPU_PEAKS = {"RTX 4090 (gpu-24gb)": 165.2, "A100 (a100-80gb)": 312.0, "H100 SXM (h100-80gb)": 989.0}

# (name, shape): ftk's tiny recipe, the benchmark's model, then the GPT-2 family at its own vocab and context.
SHAPES: List[Tuple[str, Shape]] = [
    ("gpt-tiny (4 x 256)", Shape(vocab=8192, width=256, layers=4, heads=4, seq_len=256)),
    ("bench model (6 x 384)", Shape(vocab=8192, width=384, layers=6, heads=6, seq_len=256)),
    ("8 x 512", Shape(vocab=8192, width=512, layers=8, heads=8, seq_len=256)),
    ("GPT-2 124M (12 x 768)", Shape(vocab=50257, width=768, layers=12, heads=12, seq_len=1024)),
    ("GPT-2 355M (24 x 1024)", Shape(vocab=50257, width=1024, layers=24, heads=16, seq_len=1024)),
    ("GPT-2 774M (36 x 1280)", Shape(vocab=50257, width=1280, layers=36, heads=20, seq_len=1024)),
    ("GPT-2 1.5B (48 x 1600)", Shape(vocab=50257, width=1600, layers=48, heads=25, seq_len=1024)),
]


def table(cpu_peak: float, cpu_mfu: float, gpu_mfu: float) -> str:
    gpus = list(GPU_PEAKS)
    lines = ["| model | parameters | MFLOP/token | this CPU | " + " | ".join(gpus) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(gpus)]
    for name, shape in SHAPES:
        flops = flops_per_token(shape, "pretrain", 0)
        cpu = cpu_mfu * cpu_peak * 1e9 / flops
        gpu = [gpu_mfu * GPU_PEAKS[g] * 1e12 / flops for g in gpus]
        lines.append(f"| {name} | {parameter_count(shape) / 1e6:,.1f}M | {flops / 1e6:,.1f} | {cpu:,.0f} | "
                     + " | ".join(f"{v:,.0f}" for v in gpu) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-peak", type=float, default=417.0, help="bf16 matmul GFLOP/s (bench_throughput.py)")
    ap.add_argument("--cpu-mfu", type=float, default=0.69, help="measured MFU of ftk pretraining on this CPU")
    ap.add_argument("--gpu-mfu", type=float, default=0.40, help="assumed MFU on the GPUs")
    args = ap.parse_args()
    if not (0 < args.cpu_mfu <= 1 and 0 < args.gpu_mfu <= 1 and args.cpu_peak > 0):
        print("error: --cpu-mfu and --gpu-mfu must be in (0, 1] and --cpu-peak positive", file=sys.stderr)
        return 2
    print(f"Training tokens/s per device (pretraining, bf16): CPU at {args.cpu_mfu:.0%} of {args.cpu_peak:.0f} "
          f"GFLOP/s; GPUs at {args.gpu_mfu:.0%} of their dense bf16 peak\n")
    print(table(args.cpu_peak, args.cpu_mfu, args.gpu_mfu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
