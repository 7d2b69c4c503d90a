"""QLoRA's frozen base: a transformers model whose Linear layers are 4-bit (bitsandbytes), ready for LoRA.

`load_4bit_base` loads any `AutoModelFor*` with its `nn.Linear` (and GPT-2 `Conv1D`) layers quantized to
NF4 with double quantization, keeps the output layers full precision, and runs peft's
`prepare_model_for_kbit_training`. It works on CUDA and, with bitsandbytes >= 0.45, on CPU.

`keep_4bit_trainable` works around a bitsandbytes CPU behaviour that breaks train -> evaluate -> train:

On a CPU with AVX512-BF16, `bitsandbytes.nn.Linear4bit.forward` (bitsandbytes 0.50.2: nn/modules.py:613-620)
repacks the layer's weight, the first time it runs in eval mode on an input that does not require grad (e.g.
under `torch.no_grad()`), into a CPU-only inference layout (`functional._convert_weight_packed_for_cpu`,
functional.py:1676: nibbles re-tiled to [N, K/2], double-quantized absmax expanded and rounded to bf16,
`quant_state.packing_format_for_cpu = True`), in place, on the shared `quant_state`. Nothing converts it
back when the module returns to train mode. From then on `matmul_4bit` (autograd/_functions.py:422-426)
sends that layer, in training too, to the fused inference kernel `gemv_4bit`, a custom op with no autograd
formula whose output is a view; `result += bias` on it (line 425) raises "a view of a leaf Variable that
requires grad is being used in an in-place operation" at the next training forward, and a layer without
a bias would silently pass no gradient to anything upstream (only a UserWarning). The evaluation itself
also runs in bf16 with the bf16-rounded absmax, so eval logits differ from train-mode logits (~2e-3 on a
tiny GPT-2 with logits of ~1).

The repack is gated per layer by the attribute `Linear4bit.support_avx512bf16_for_cpu`, set once in
`__init__` from `has_avx512bf16()` (modules.py:573). bitsandbytes documents no switch for it; setting
the attribute to False on each 4-bit layer disables the repack for that layer only, so evaluation uses
the same `gemm_4bit` path as training (identical outputs) and the 4-bit weights are never
rewritten. Undoing the repack when returning to train mode is not an equivalent fix: the inverse
(`_convert_weight_packed_for_cpu_inverse`) re-quantizes the bf16-rounded absmax, so the frozen base would
drift at every evaluation. `keep_4bit_trainable` uses that inverse only to repair layers that were
already repacked before it was installed, and warns when it does.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from ftk.errors import UsageError

# Modules kept out of quantization: output layers, which are small, numerically sensitive, and (for a
# new classification head) freshly initialized and trained in full precision. Matched by transformers
# as a suffix of the module name or a prefix up to a module boundary ("classifier" also keeps
# "classifier.dense" and "classifier.out_proj").
FULL_PRECISION_MODULES = ("lm_head", "score", "classifier")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("regime=qlora needs bitsandbytes: pip install 'ftk[quant]'") from None
    return bitsandbytes


def bnb_4bit_config(compute_dtype: torch.dtype, *, quant_type: str = "nf4", skip_modules: Sequence[str] = ()):
    """The BitsAndBytesConfig of a QLoRA base: 4-bit `quant_type` (NF4) weights with double quantization,
    matmuls in `compute_dtype`, `FULL_PRECISION_MODULES` + `skip_modules` left unquantized.

    Passing `llm_int8_skip_modules` replaces transformers' default skip list (the output embedding and the
    last module), so `FULL_PRECISION_MODULES` restates it."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=list(dict.fromkeys([*FULL_PRECISION_MODULES, *skip_modules])),
    )


def load_4bit_base(name_or_path: str, auto_class, compute_dtype: torch.dtype, *, quant_type: str = "nf4",
                   skip_modules: Sequence[str] = (), keep_trainable: bool = True, **from_pretrained_kwargs):
    """Load a transformers model with its Linear (and GPT-2 Conv1D) layers quantized to 4-bit NF4 by
    bitsandbytes (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)), modules that must stay full
    precision (a new classification head named `score` or `classifier`, lm_head, plus `skip_modules`) kept
    out of quantization, then peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    (all parameters frozen, fp16/bf16 non-quantized parameters upcast to fp32).

    `auto_class` is e.g. `transformers.AutoModelForCausalLM` or `AutoModelForSequenceClassification` (pass
    num_labels etc. in `from_pretrained_kwargs`). Without a `device_map` the model goes to the current CUDA
    device if there is one, else to the CPU. With `keep_trainable` (the default), `keep_4bit_trainable` is
    installed so evaluating on a CPU does not break later training steps. Returns the model, or
    `(model, loading_info)` when `output_loading_info=True` is passed, as `from_pretrained` does.
    """
    _bitsandbytes()
    from peft import prepare_model_for_kbit_training

    if "quantization_config" in from_pretrained_kwargs:
        raise TypeError("load_4bit_base builds its own quantization_config; pass quant_type/skip_modules instead")
    if "device_map" not in from_pretrained_kwargs:
        on_gpu = torch.cuda.is_available()
        from_pretrained_kwargs["device_map"] = {"": torch.cuda.current_device() if on_gpu else "cpu"}
    config = bnb_4bit_config(compute_dtype, quant_type=quant_type, skip_modules=skip_modules)
    loaded = auto_class.from_pretrained(name_or_path, quantization_config=config, **from_pretrained_kwargs)
    with_info = bool(from_pretrained_kwargs.get("output_loading_info"))
    model, info = loaded if with_info else (loaded, None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if keep_trainable:
        keep_4bit_trainable(model)
    return (model, info) if with_info else model


def keep_4bit_trainable(model: Any) -> None:
    """Keep a 4-bit model trainable across evaluations on CPU: stop every bitsandbytes `Linear4bit` in
    `model` (peft-wrapped or not; found through `model.modules()`, so LoRA's `base_layer`s included) from
    repacking its weight into the CPU-only inference layout in eval mode, and convert back any layer that
    was already repacked. Per layer, no global patch; idempotent; a no-op for layers on CUDA, for CPUs
    without AVX512-BF16 and for bitsandbytes versions without the repack. See the module docstring."""
    bnb = _bitsandbytes()
    repaired = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        # Gate of the eval-mode repack in Linear4bit.forward (present in 0.50.2; harmless where absent).
        module.support_avx512bf16_for_cpu = False
        if _unpack_cpu_layout(module):
            repaired.append(name)
    if repaired:
        warnings.warn(
            f"{len(repaired)} 4-bit layer(s) (first: {repaired[0]!r}) had been repacked into bitsandbytes' CPU "
            "inference layout by an eval-mode forward before keep_4bit_trainable was installed; converted back. "
            "Their absmax went through bf16, so these frozen weights now differ slightly from the loaded ones. "
            "Install keep_4bit_trainable (load_4bit_base does) before the first evaluation to avoid this.",
            RuntimeWarning, stacklevel=2)


def is_cpu_packed(module: Any) -> bool:
    """Whether a bitsandbytes 4-bit layer's weight is in the CPU-only inference layout (see module docstring)."""
    weight = getattr(module, "weight", None)
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _unpack_cpu_layout(module: Any) -> bool:
    """Convert a repacked layer's weight back to the standard 4-bit layout; True if it was repacked."""
    if not is_cpu_packed(module):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    module.quant_state = weight.quant_state
    return True
