"""Turn a hardware profile (which may say `auto`) into concrete choices for this machine and launch.

Everything here is decided once, before the model is built, and recorded in the run summary:
device, precision, world size, micro-batch and gradient accumulation, optimizer, torch.compile.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Tuple

from ftk.errors import UsageError
from ftk.schemas import Device, Optimizer, Precision, Strategy

# Runs shorter than this many optimizer steps do not recover torch.compile's start-up cost.
COMPILE_MIN_STEPS = 300
# On a CPU compile stays off unless asked for (hardware.compile=true). Measured on the 14M GPT-2 of
# scripts/bench_throughput.py (AVX-512 BF16, torch 2.13, bf16 autocast, matmul attention, chunked
# cross-entropy): a compiled step took 0.693 s against 0.675 s eager (0.99x), after 42 s of compilation on a
# fresh inductor cache (10 s warm). Inductor fuses the elementwise work between the matmuls, and ftk's CPU
# attention and loss already do that where it counted; `bench_throughput.py --compile-row` re-measures it.

# ftk.cpu_attention keeps each layer's (batch x heads x seq x seq) attention probabilities for the backward
# pass, which the flash kernel does not; beyond this size per layer (batch 8 x 12 heads x 512 x 512 in bf16 is
# 48 MiB) calls go to SDPA, whose memory grows linearly with the sequence. Here, not in ftk.cpu_attention, so
# that the memory planner can read it without importing torch.
MAX_ATTENTION_PROBS_BYTES = 64 << 20


def probs_bytes(batch: int, heads: int, seq: int, itemsize: int = 2) -> int:
    """What one layer keeps for its backward pass on the matmul-attention path (0 where it defers to SDPA)."""
    size = batch * heads * seq * seq * itemsize
    return size if size <= MAX_ATTENTION_PROBS_BYTES else 0


@dataclass
class Plan:
    device: str             # "cpu" | "cuda"
    precision: str          # "fp32" | "bf16" | "fp16"
    world_size: int
    micro_batch_size: int   # sequences per forward per process
    grad_accum: int         # forwards per optimizer step per process
    optimizer: str          # "adamw" | "adamw_fused" | "adamw_8bit"
    compile: bool
    strategy: str           # "none" | "ddp" | "fsdp"
    matmul_attention: bool = False  # SDPA replaced by ftk.cpu_attention (CPU bf16 only)

    def as_dict(self) -> dict:
        return asdict(self)


def torch_dtype(precision: str):
    """The torch dtype a precision name stands for: fp32, bf16, fp16 (also qlora's compute dtypes, merge dtypes)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_has_bf16() -> bool:
    import torch

    try:  # AVX-512 BF16 or AMX make bf16 matmuls faster than fp32; without them bf16 is emulated and slower
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


# bf16 runs at full speed from compute capability 8.0 (Ampere: A100, A10, RTX 30xx; then Hopper, Ada...).
# Volta (V100, 7.0) and Turing (T4, 7.5) have fp16 tensor cores only, yet torch.cuda.is_bf16_supported()
# says True there (it counts emulation): bf16 would run several times slower than fp16.
BF16_MIN_CAPABILITY = (8, 0)


def cuda_capability() -> Optional[Tuple[int, int]]:
    """The current CUDA device's compute capability, or None when no CUDA device is visible."""
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def auto_precision(device: str, capability: Optional[Tuple[int, int]] = None, cpu_bf16: Optional[bool] = None) -> str:
    """What `hardware.precision=auto` means: the one rule, shared by the run and the memory planner.

    CUDA: bf16 where the GPU computes it natively (capability >= 8.0), else fp16 (with a loss scaler); a GPU
    not visible from here (planning on a login node) is assumed recent. CPU: bf16 where the CPU has bf16
    instructions, else fp32."""
    if device == "cuda":
        return "bf16" if capability is None or tuple(capability) >= BF16_MIN_CAPABILITY else "fp16"
    return "bf16" if (cpu_has_bf16() if cpu_bf16 is None else cpu_bf16) else "fp32"


def qlora_compute_dtype(setting: str, precision: str) -> str:
    """QLoRA's de-quantized matmul dtype: `regime.compute_dtype=auto` follows the run's precision (fp16 on GPUs
    without native bf16), keeping bf16 for bf16 and fp32 runs as the QLoRA paper does."""
    if setting != "auto":
        return setting
    return "fp16" if precision == "fp16" else "bf16"


def resolve(hw: Any, batch_size: int, max_steps: int, *, world: Optional[int] = None,
            lenient: bool = False) -> Plan:
    """The plan for `hw` (a HardwareConfig) and a run of `max_steps` steps of `batch_size` sequences over `world`
    processes (None: as launched). The one place `auto` settings become concrete. `lenient` (ftk estimate)
    plans for a device or process count this machine lacks instead of refusing it."""
    import torch

    device = Device(hw.device)
    if device is Device.auto:
        device = Device.cuda if torch.cuda.is_available() else Device.cpu
    if device is Device.cuda and not torch.cuda.is_available() and not lenient:
        raise UsageError("hardware.device=cuda but no CUDA device is visible; use hardware=cpu or hardware=auto")
    precision = Precision(hw.precision)
    if precision is Precision.auto:
        precision = Precision(auto_precision(device.value, cuda_capability() if device is Device.cuda else None))
    if precision is Precision.fp16 and device is Device.cpu and not lenient:
        raise UsageError("hardware.precision=fp16 needs a CUDA device; on a CPU use bf16 or fp32")

    world = world or world_size()
    if batch_size % world and not lenient:
        raise UsageError(f"train.batch_size={batch_size} is not divisible by the {world} processes; "
                         f"use a multiple of {world}")
    per_process = max(1, batch_size // world)
    micro = min(hw.micro_batch_size or per_process, per_process)
    if per_process % micro and not lenient:
        raise UsageError(f"hardware.micro_batch_size={micro} does not divide the per-process batch {per_process} "
                         f"(train.batch_size={batch_size} over {world} processes); pick a divisor")

    optimizer = Optimizer(hw.optimizer)
    if optimizer is Optimizer.auto:
        optimizer = Optimizer.adamw_fused  # torch's fused AdamW runs on CPU and CUDA alike
    compile_ = hw.compile if hw.compile is not None else (device is Device.cuda and max_steps >= COMPILE_MIN_STEPS)
    cpu_bf16 = device is Device.cpu and precision is Precision.bf16
    matmul_attention = getattr(hw, "matmul_attention", None)
    matmul_attention = cpu_bf16 if matmul_attention is None else bool(matmul_attention) and cpu_bf16

    strategy = Strategy(hw.strategy)
    if strategy is Strategy.auto:
        strategy = Strategy.ddp if world > 1 else Strategy.none
    if strategy is Strategy.none and world > 1 and not lenient:
        raise UsageError(f"hardware.strategy=none but {world} processes were launched; use hardware.strategy=ddp "
                         "(or auto), or launch one process")
    return Plan(device.value, precision.value, world, micro, per_process // micro, optimizer.value,
                bool(compile_), strategy.value, matmul_attention)


def configure_cuda(plan: Plan) -> None:
    """Per-job CUDA settings. fp32 runs use TF32 tensor cores for matmuls (Ampere and later: ~8x the fp32 rate,
    10-bit mantissa inputs with fp32 accumulation, as PyTorch recommends for training); bf16/fp16 runs are
    autocast and unaffected. And the previous job of an in-process sweep (`-m`) leaves its freed blocks in
    torch's cache: collect and return them, so this job starts with the whole GPU."""
    if plan.device != "cuda":
        return
    import gc

    import torch

    torch.set_float32_matmul_precision("high" if plan.precision == "fp32" else "highest")
    torch.backends.cudnn.allow_tf32 = plan.precision == "fp32"
    gc.collect()
    torch.cuda.empty_cache()


def set_threads(num_threads: Optional[int]) -> None:
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)


def use_fused_kernels(model: Any) -> int:
    """Swap modules for fused kernels that compute the same function; returns how many were swapped.

    GPT-2 and its relatives default to `gelu_new`, the tanh approximation of GELU written as seven elementwise
    torch ops, each a pass over the (batch, seq, 4*width) MLP activations, with as many again in the backward.
    torch's gelu(approximate="tanh") is the same formula in one kernel (agreeing to 2e-7 in float32) and, on
    this CPU, about 3x faster forward + backward: ~6% of a training step of the 14M GPT-2 in
    scripts/bench_throughput.py. Only the module objects change; the config and saved weights do not, so a
    saved model loads and behaves as before anywhere.
    """
    import torch

    try:
        from transformers.activations import NewGELUActivation
    except ImportError:
        return 0

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped
