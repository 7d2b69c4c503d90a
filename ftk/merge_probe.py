"""Merge-adapter's model side: the base loaded with the adapter (peft), what the adapter adds, and the probe
that compares base + adapter with the merged model on seeded random token ids."""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ftk.errors import UsageError, first_line
from ftk.hardware import torch_dtype
from ftk.merge import Adapter, needs_base
from ftk.schemas import Objective

PROBE_BATCH_SIZE = 4


@dataclass
class Probe:
    batches: List[Dict[str, Any]] = field(default_factory=list)
    length: int = 0


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' and peft's load-time warnings (new head initialised, Conv1D fan_in_fan_out) are expected
    here and said better by the summary; keep stderr to our lines."""
    import transformers

    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.utils.logging.set_verbosity(level)


def load_kwargs(objective: Objective, labels: List[str], tokenizer: Any, trust_remote_code: bool) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"trust_remote_code": trust_remote_code}
    from ftk.objectives.table import facts

    if facts(objective).head == "sequence_classification":  # classification, reward models
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
    return kwargs


def load_with_adapter(adapter: Adapter, base: str, cls: Any, kwargs: Dict[str, Any], dtype: Any):
    """(PeftModel of base + adapter in eval mode, names of base parameters freshly initialised on load)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        with quiet():
            model, info = cls.from_pretrained(base, dtype=dtype, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the base '{base}' as {cls.__name__}: {first_line(exc)}") from None
    try:
        with quiet():
            wrapped = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(f"the adapter {adapter.path} does not fit the base {base}: {first_line(exc)}"
                         + needs_base(adapter, base)) from None
    saved = adapter.path / "adapter_model.safetensors"
    if saved.is_file():  # peft only warns about adapter weights that found no module: refuse instead
        loaded = set(get_peft_model_state_dict(wrapped))
        stray = sorted(set(load_file(str(saved))) - loaded)
        if stray:
            raise UsageError(f"the adapter {adapter.path} does not fit the base {base}: {len(stray)} of its tensors "
                             f"(first: {stray[0]}) match no module of it" + needs_base(adapter, base))
    return wrapped.eval(), sorted(set(info.get("missing_keys", [])))


def tuner_modules(model: Any) -> Tuple[List[str], List[str]]:
    """(names of the adapter layers merged into base weights, names of modules_to_save kept whole)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    layers = [n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)]
    saved = [n for n, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return layers, saved


def refuse_random_head(new_params: List[str], kept: List[str], adapter: Adapter, base: str) -> None:
    """Parameters the base lacked (a new head) must come from the adapter's modules_to_save, or the merged
    model would carry a random head that no probe can catch (reference and merged share it)."""
    uncovered = [p for p in new_params if not any(p == k or p.startswith(k + ".") for k in kept)]
    if uncovered:
        raise UsageError(f"the base {base} lacks {', '.join(uncovered[:3])}{' ...' if len(uncovered) > 3 else ''} and "
                         f"the adapter {adapter.path} does not hold it (modules_to_save); the merged model would have "
                         "a random head" + needs_base(adapter, base))


def probe_inputs(tokenizer: Any, vocab_rows: int, n_batches: int, length: int, seed: int, append_eos: bool,
                 padding_side: str) -> Probe:
    """Seeded random ordinary tokens (no special ones), lengths from length/2 to length, padded with an
    attention mask on the side the model was trained with; a decoder classifier's inputs end with eos."""
    import torch

    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), vocab_rows)) if i not in special])
    if len(ordinary) == 0:
        raise UsageError("the tokenizer has no ordinary tokens to build probe inputs from")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id if append_eos else None
    g = torch.Generator().manual_seed(seed)
    probe = Probe(length=length)
    for _ in range(n_batches):
        ids = torch.full((PROBE_BATCH_SIZE, length), pad, dtype=torch.long)
        mask = torch.zeros((PROBE_BATCH_SIZE, length), dtype=torch.long)
        for row in range(PROBE_BATCH_SIZE):
            n = length if row == 0 else int(torch.randint(max(2, length // 2), length + 1, (1,), generator=g))
            tokens = ordinary[torch.randint(len(ordinary), (n,), generator=g)]
            if eos is not None:
                tokens[-1] = eos
            where = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[row, where], mask[row, where] = tokens, 1
        probe.batches.append({"input_ids": ids, "attention_mask": mask})
    return probe


def probe_logits(model: Any, probe: Probe, to_host: bool = True) -> List[Any]:
    """fp32 logits of every probe batch: per sequence for a classifier, per real (unpadded) token otherwise.
    The inputs go to the model's device (a 4-bit base loads onto the GPU when there is one: host inputs made
    its check fail there) and the logits come back to the host, where every model's are compared."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for host_batch in probe.batches:
            batch = {key: value.to(device) for key, value in host_batch.items()}
            logits = model(**batch).logits.float()
            logits = logits if logits.dim() == 2 else logits[batch["attention_mask"].bool()]
            out.append(logits.cpu() if to_host else logits)
    return out


def max_difference(a: List[Any], b: List[Any]) -> float:
    import torch

    diffs = [(x - y).abs().max() for x, y in zip(a, b)]
    worst = torch.stack(diffs).max()
    return float("inf") if not torch.isfinite(worst) else float(worst)


def quantization_error(adapter: Adapter, base: str, cls: Any, kwargs: Dict[str, Any], probe: Probe,
                       merged_logits: List[Any]) -> Tuple[Optional[float], str]:
    """max |logit difference| of the merged model vs the 4-bit base + adapter it was trained as
    (the quantization error), with the 4-bit settings of the run when its config is there."""
    try:
        from ftk.regimes.qlora_base import load_4bit_base  # installs keep_4bit_trainable: no CPU repack
        from peft import PeftModel

        settings = {"compute_dtype": "bf16", "quant_type": "nf4"}
        run_config = adapter.path.parent / ".hydra" / "config.yaml"
        if run_config.is_file():
            from omegaconf import OmegaConf

            regime = OmegaConf.load(run_config).get("regime", {}) or {}
            settings.update({k: regime[k] for k in settings if regime.get(k)})
        if settings["compute_dtype"] == "auto":  # as the run resolved it, from its precision
            from ftk.hardware import qlora_compute_dtype

            environment = adapter.path.parent / "environment.json"
            plan = json.loads(environment.read_text()).get("plan", {}) if environment.is_file() else {}
            settings["compute_dtype"] = qlora_compute_dtype("auto", plan.get("precision", "bf16"))
        with quiet():
            four_bit = load_4bit_base(base, cls, torch_dtype(settings["compute_dtype"]),
                                      quant_type=settings["quant_type"], **kwargs)
            four_bit = PeftModel.from_pretrained(four_bit, str(adapter.path), is_trainable=False).eval()
            error = max_difference(probe_logits(four_bit, probe), merged_logits)
        del four_bit
        return error, f"{settings['quant_type']}, compute {settings['compute_dtype']}"
    except (ImportError, UsageError, RuntimeError, ValueError, OSError) as exc:
        return None, f"not measured ({first_line(exc)})"


