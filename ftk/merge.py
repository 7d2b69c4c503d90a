"""`ftk merge-adapter`: fold a LoRA adapter (and its trained head) into its base, check, and write it.

    adapter (final/ of `ftk finetune regime=lora|qlora`)  +  its base (full precision, never 4-bit)
      -> PeftModel (the reference: probe logits of base + adapter, fp32)
      -> merge_and_unload(): LoRA deltas added into the base weights, modules_to_save (the new head)
         become the plain head modules -> cast to `dtype` -> probe logits again
      -> refused unless max |logit difference| <= tolerance; then written to a temp dir next to
         output_dir and renamed into place, with the tokenizer and merge.json.

The result is a plain Hugging Face model directory: `AutoModelFor*.from_pretrained(dir)` loads it with
no peft installed. Everything the user can get wrong is refused with one line (UsageError, exit 2)
before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ftk import runs
from ftk.hardware import torch_dtype
from ftk.errors import UsageError
from ftk.schemas import Objective

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}
# peft methods whose weights merge_and_unload folds into the base (ftk itself writes LORA adapters).
MERGEABLE = ("LORA", "ADALORA", "LOHA", "LOKR", "IA3")
# peft methods that add inputs (virtual tokens) rather than change weights: nothing to merge.
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
KIND = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3"}
PROBE_BATCH_SIZE = 4
# Keys of a saved config.json that only make sense with peft or a quantized base.
PEFT_ONLY_CONFIG_KEYS = ("quantization_config", "_pre_quantization_dtype")


@dataclass
class Adapter:
    path: Path
    chosen: str                 # how it was chosen: "given" | "the newest finetune run with an adapter"
    config: Dict[str, Any]      # adapter_config.json
    record: Dict[str, Any]      # ftk_finetune.json (or what could be inferred without it)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "?")).upper()

    @property
    def named_base(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path") or self.record.get("base_model")


@dataclass
class Probe:
    batches: List[Dict[str, Any]] = field(default_factory=list)
    length: int = 0


# --------------------------------------------------------------------------------------------- choices


def check_settings(cfg: Any) -> Tuple[str, float]:
    """(dtype, tolerance) after the checks types cannot express (numeric ranges: see MergeConfig)."""
    from ftk import ranges

    ranges.check(cfg)
    dtype = str(cfg.dtype)
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    tolerance = DEFAULT_TOLERANCE[dtype] if cfg.tolerance is None else float(cfg.tolerance)
    return dtype, tolerance


def newest_adapter(root: Path = Path("runs")) -> Optional[Path]:
    """final/ of the newest `ftk finetune` run under root/finetune*/ that holds an adapter; a mergeable
    (LoRA) one is preferred over a newer prompt-tuning one."""
    return runs.newest_final("finetune*", lambda final: (final / "adapter_config.json").is_file(),
                             prefer=lambda final: _peft_type(final) in MERGEABLE, root=root)


def _peft_type(adapter_dir: Path) -> str:
    try:
        return str(json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type", "")).upper()
    except (OSError, ValueError):
        return ""


def choose_adapter(adapter_path: Optional[str]) -> Adapter:
    if adapter_path is None:
        newest = newest_adapter()
        if newest is None:
            raise UsageError("no adapter given and no finetune run with an adapter under ./runs/finetune*/; pass "
                             "adapter_path=<final/ of an `ftk finetune regime=lora` run>")
        path, chosen = newest.resolve(), "the newest finetune run with an adapter"
    else:
        given = Path(adapter_path).expanduser()
        if not given.exists():
            raise UsageError(f"adapter_path={adapter_path} does not exist; pass the final/ folder of an "
                             "`ftk finetune regime=lora` run")
        if not given.is_dir():
            raise UsageError(f"adapter_path={adapter_path} is a file; pass the folder that holds adapter_config.json")
        if not (given / "adapter_config.json").is_file():
            if (given / "config.json").is_file():
                raise UsageError(f"adapter_path={adapter_path} is already a full model (config.json, no "
                                 "adapter_config.json): there is nothing to merge; use it directly as "
                                 f"model.name_or_path={adapter_path}")
            if (given / "final" / "adapter_config.json").is_file():
                raise UsageError(f"adapter_path={adapter_path} is a run folder; pass its adapter: "
                                 f"adapter_path={given / 'final'}")
            raise UsageError(f"adapter_path={adapter_path} is not an adapter: no adapter_config.json in it; pass the "
                             "final/ folder of an `ftk finetune regime=lora` run")
        path, chosen = given.resolve(), "given"
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except ValueError as exc:
        raise UsageError(f"{path / 'adapter_config.json'} is not valid JSON ({exc})") from None
    record: Dict[str, Any] = {}
    if (path / "ftk_finetune.json").is_file():
        record = json.loads((path / "ftk_finetune.json").read_text())
    from ftk.models import check_weight_files

    check_weight_files(path)  # a truncated adapter_model.safetensors: one line, not peft's traceback
    return Adapter(path, chosen, config, record)


def refuse_unmergeable(adapter: Adapter) -> None:
    kind = adapter.peft_type
    if kind in PROMPT_LEARNING:
        base = adapter.named_base or "<base model>"
        raise UsageError(f"{adapter.path} is a {kind.lower().replace('_', '-')} adapter: its soft prompt is an input, "
                         "not a change to any weight, so there is nothing to merge; use it as it is with "
                         f"`ftk evaluate model.name_or_path={base} adapter_path={adapter.path}`, or train a "
                         "mergeable adapter with `ftk finetune regime=lora`")
    if kind not in MERGEABLE:
        raise UsageError(f"{adapter.path} is a {kind} adapter; ftk merge-adapter merges {', '.join(MERGEABLE)} "
                         "adapters (`ftk finetune regime=lora` or regime=qlora)")


def choose_output(output_dir: Optional[str], adapter: Adapter) -> Tuple[Path, str]:
    """(output dir, how it was chosen). Unset: <run>/merged for a run's final/, else <adapter>-merged."""
    if output_dir:
        return Path(output_dir).expanduser().resolve(), "given"
    a = adapter.path
    run_dir = a.parent if (a.name == "final" or (a.parent / "summary.json").is_file()) else None
    if run_dir is not None:
        return run_dir / "merged", "<adapter run dir>/merged"
    return a.with_name(a.name + "-merged"), "next to the adapter"


def refuse_output(out: Path, overwrite: bool, protected: List[Path]) -> None:
    for keep in protected:
        if out == keep or out in keep.parents:
            raise UsageError(f"output_dir={out} would replace {keep}, which the merge reads; pass another "
                             "output_dir=...")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"output_dir={out} is a file; pass a folder that does not exist yet (or is empty)")
    if any(out.iterdir()) and not overwrite:
        raise UsageError(f"output_dir={out} exists and is not empty; pass another output_dir=..., or "
                         "overwrite=true to replace it")
    if any(out.iterdir()) and not (out / "merge.json").is_file():
        raise UsageError(f"output_dir={out} holds files ftk merge-adapter did not write (no merge.json); "
                         "overwrite=true replaces only an earlier merge: pass another output_dir=...")


# What an earlier merge wrote, for a merge.json that does not list its files (older ftk).
WRITTEN_BY_MERGE = ("config.json", "generation_config.json", "merge.json", "ftk_finetune.json", "model.safetensors",
                    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "tokenizer.model")


def written_by_merge(out: Path) -> List[str]:
    """Top-level names an earlier merge wrote into `out` (from its merge.json)."""
    try:
        listed = json.loads((out / "merge.json").read_text()).get("files")
    except (OSError, ValueError):
        listed = None
    if listed is not None:
        return list(listed)
    return [p.name for p in out.iterdir()
            if p.name in WRITTEN_BY_MERGE or (p.name.startswith("model-") and p.name.endswith(".safetensors"))]


def choose_base(given: Optional[str], adapter: Adapter) -> Tuple[str, str]:
    from ftk.models import check_model_path

    if given:
        check_model_path(given)
        path = Path(given).expanduser()
        return (str(path.resolve()) if path.exists() else given), "model.name_or_path"
    named = adapter.named_base
    if not named:
        raise UsageError(f"{adapter.path / 'adapter_config.json'} names no base model; pass "
                         "model.name_or_path=<the model the adapter was trained on>")
    path = Path(named).expanduser()
    if named.startswith(("/", ".", "~")) and not path.exists():
        raise UsageError(f"the adapter's base {named} does not exist (moved or deleted?); pass "
                         "model.name_or_path=<where that model is now>")
    if path.exists():
        check_model_path(named)  # whole weight files, before anything is loaded
    return named, "named by the adapter"


# ------------------------------------------------------------------------------------------ compatibility

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "n_embd", "n_layer", "n_head", "n_inner")


def _shape(config: Any) -> Dict[str, Any]:
    return {k: getattr(config, k) for k in SHAPE_KEYS if getattr(config, k, None) is not None}


def describe_shape(config: Any) -> str:
    s = _shape(config)
    hidden = s.get("hidden_size", s.get("n_embd"))
    layers = s.get("num_hidden_layers", s.get("n_layer"))
    return f"{s.get('model_type', '?')}, hidden {hidden}, {layers} layers, vocabulary {s.get('vocab_size')}"


def needs_base(adapter: Adapter, base: str) -> str:
    """The hint naming the base the adapter was trained on (for refusals)."""
    named = adapter.named_base
    if not named or named == base:
        return "; pass model.name_or_path=<the model the adapter was trained on>"
    local = named.startswith(("/", ".", "~"))
    if local and not Path(named).expanduser().exists():
        return f"; the adapter needs the base it was trained on, {named} (no longer there): pass model.name_or_path=<it>"
    return f"; the adapter needs its own base: pass model.name_or_path={named} (or leave it unset)"


def refuse_other_shape(adapter: Adapter, base: str, base_config: Any, trust_remote_code: bool) -> None:
    """A base given by model.name_or_path must have the shapes of the one the adapter was trained on."""
    from transformers import AutoConfig

    named = adapter.named_base
    if not named or named == base or not Path(named).expanduser().exists():
        return
    try:
        trained_on = AutoConfig.from_pretrained(named, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return
    if _shape(trained_on) != _shape(base_config):
        raise UsageError(f"the adapter was trained on {named} ({describe_shape(trained_on)}) but "
                         f"model.name_or_path={base} is {describe_shape(base_config)}: its shapes differ"
                         + needs_base(adapter, base))


def refuse_other_vocabulary(adapter: Adapter, base: str, tokenizer: Any, trust_remote_code: bool) -> None:
    """The adapter's tokenizer (saved with it) must be the base's: the same ids for the same tokens."""
    from ftk.data.tokenizer import TOKENIZER_FILES

    if not Path(base).expanduser().is_dir() or not any((Path(base) / f).is_file() for f in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    try:
        base_tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return
    if base_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"the adapter's tokenizer ({len(tokenizer):,} tokens) is not the tokenizer of "
                         f"{base} ({len(base_tokenizer):,} tokens): the adapter was trained on another vocabulary"
                         + needs_base(adapter, base))


def objective_of(adapter: Adapter, base_config: Any) -> Objective:
    """What the adapter was trained for: its run's record, else the objective of its peft task_type, else the
    base's language objective."""
    from ftk.finetune_setup import lm_objective
    from ftk.objectives.table import ROWS

    if adapter.record.get("objective"):
        return Objective(adapter.record["objective"])
    task = adapter.config.get("task_type")
    named = [row.name for row in ROWS if task and row.peft_task_type == task]
    return Objective(named[0]) if named else lm_objective(base_config)


def labels_of(adapter: Adapter) -> List[str]:
    """Class names (index = class id): ftk_finetune.json, else as many LABEL_i as the saved head has rows."""
    if adapter.record.get("labels"):
        return list(adapter.record["labels"])
    from safetensors import safe_open

    heads = adapter.config.get("modules_to_save") or ["score", "classifier"]
    weights = adapter.path / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                module = key.rsplit(".", 1)[0]
                if key.endswith(".weight") and any(module.endswith(h) for h in heads) and \
                        len(f.get_slice(key).get_shape()) == 2:
                    return [f"LABEL_{i}" for i in range(f.get_slice(key).get_shape()[0])]
    raise UsageError(f"{adapter.path} is a classification adapter without ftk_finetune.json, and its head's "
                     "number of classes cannot be read from adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ model


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
    if objective is Objective.classification:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
    return kwargs


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # torch's "Error(s) in loading state_dict for X:\n\tsize mismatch for ...": the second line says what
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        return lines[1].rstrip(".")
    return lines[0] if lines else type(exc).__name__


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


# ------------------------------------------------------------------------------------------------ probe


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


def probe_logits(model: Any, probe: Probe) -> List[Any]:
    """fp32 logits of every probe batch: per sequence for a classifier, per real (unpadded) token otherwise."""
    import torch

    out = []
    with torch.no_grad():
        for batch in probe.batches:
            logits = model(**batch).logits.float()
            out.append(logits if logits.dim() == 2 else logits[batch["attention_mask"].bool()])
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
        with quiet():
            four_bit = load_4bit_base(base, cls, torch_dtype(settings["compute_dtype"]),
                                      quant_type=settings["quant_type"], **kwargs)
            four_bit = PeftModel.from_pretrained(four_bit, str(adapter.path), is_trainable=False).eval()
            error = max_difference(probe_logits(four_bit, probe), merged_logits)
        del four_bit
        return error, f"{settings['quant_type']}, compute {settings['compute_dtype']}"
    except (ImportError, UsageError, RuntimeError, ValueError, OSError) as exc:
        return None, f"not measured ({first_line(exc)})"


# ------------------------------------------------------------------------------------------------ write


def clean_config(path: Path) -> List[str]:
    """Drop keys from a saved config.json that only peft or a quantized base would use."""
    config = json.loads(path.read_text())
    removed = [k for k in list(config) if k in PEFT_ONLY_CONFIG_KEYS or "peft" in k.lower()]
    if removed:
        for k in removed:
            del config[k]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return removed


def write_atomically(out: Path, fill) -> None:
    """fill(tmp) builds the model directory in a temp dir next to `out`, which is then renamed into place
    (replacing an empty or, with overwrite, an old one only at the end). Of an earlier merge's folder only what
    that merge wrote is replaced: anything else the user put there is moved into the new folder first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the merged model private to this user
    try:
        fill(tmp)
        if out.exists():
            ours = set(written_by_merge(out)) if (out / "merge.json").is_file() else set()
            for entry in out.iterdir():
                if entry.name not in ours and not (tmp / entry.name).exists():
                    os.replace(entry, tmp / entry.name)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_adapter(cfg: Any) -> Dict[str, Any]:
    started = time.time()
    dtype, tolerance = check_settings(cfg)
    from rich.console import Console

    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading and saving take seconds; our lines say what
    console = Console(stderr=True, highlight=False, soft_wrap=True)  # paths stay whole, greppable
    say = console.print

    adapter = choose_adapter(cfg.adapter_path)
    refuse_unmergeable(adapter)
    out, out_chosen = choose_output(cfg.output_dir, adapter)
    base, base_chosen = choose_base(cfg.model.name_or_path, adapter)
    protected = [adapter.path] + ([Path(base).expanduser().resolve()] if Path(base).expanduser().exists() else [])
    refuse_output(out, bool(cfg.overwrite), protected)
    from ftk.paths import require_writable_dir

    # The merged model is written to a temp folder next to output_dir and renamed: that folder must be writable
    # now, not after the whole merge has been computed.
    require_writable_dir(out.parent, f"output_dir={out}", "pass an output_dir=<folder you can write to>")
    if adapter.chosen != "given":
        say(f"adapter: {adapter.path} ({adapter.chosen})")
    say(f"output: {out}" + (f" ({out_chosen})" if out_chosen != "given" else ""))

    import torch
    from transformers import AutoConfig

    from ftk import finetune_setup as setup

    trust = bool(cfg.model.trust_remote_code)
    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the config of the base '{base}': {first_line(exc)}") from None
    quantized = getattr(base_config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        raise UsageError(f"the base {base} is stored quantized ({method}); merging needs its full-precision weights: "
                         "pass model.name_or_path=<the unquantized model>")
    refuse_other_shape(adapter, base, base_config, trust)
    tokenizer = setup.load_tokenizer(str(adapter.path) if _has_tokenizer(adapter.path) else base, trust)
    refuse_other_vocabulary(adapter, base, tokenizer, trust)
    from ftk import base_fingerprint

    same_base = base_fingerprint.check(adapter.path, adapter.record, base, bool(cfg.allow_other_base), say)

    objective = objective_of(adapter, base_config)
    labels = labels_of(adapter) if objective is Objective.classification else []
    encoder = setup.is_encoder(base_config)
    cls = setup.auto_class(objective)
    kwargs = load_kwargs(objective, labels, tokenizer, trust)
    quantized_base = bool(adapter.record.get("quantized_base"))
    regime = adapter.record.get("regime") or adapter.peft_type.lower()
    say(f"base: {base} ({base_chosen}), as {cls.__name__} in fp32"
        + (" - de-quantized: the adapter was trained on a 4-bit copy of it (QLoRA); it is merged into the "
           f"full-precision weights, written in {dtype}, never into 4-bit weights" if quantized_base else ""))

    model, new_params = load_with_adapter(adapter, base, cls, kwargs, torch.float32)
    vocab_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_rows:
        raise UsageError(f"the adapter's tokenizer has {len(tokenizer):,} tokens but the base {base} has "
                         f"{vocab_rows:,} embeddings" + needs_base(adapter, base))
    layers, kept = tuner_modules(model)
    refuse_random_head(new_params, kept, adapter, base)
    if not layers:
        raise UsageError(f"the adapter {adapter.path} adds no layer to the base {base}: nothing to merge")

    from ftk.models import usable_positions

    positions = usable_positions(base_config)
    length = min(int(cfg.probe_len), int(positions)) if positions else int(cfg.probe_len)
    probe = probe_inputs(tokenizer, vocab_rows, int(cfg.probe_batches), length, int(cfg.seed),
                         bool(adapter.record.get("append_eos")) and not encoder,
                         adapter.record.get("padding_side", "right"))
    reference = probe_logits(model, probe)

    try:
        with quiet():
            merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge: the merged weights would hold NaN/inf
        raise UsageError(f"merging {adapter.path} into {base} failed: {first_line(exc)}; nothing written") from None
    del model
    leftover = _peft_leftovers(merged)
    if leftover:
        raise RuntimeError(f"merge_and_unload left peft modules in the model: {leftover[:3]}")
    merged = merged.to(torch_dtype(dtype)).eval()
    merged_logits = probe_logits(merged, probe)
    diff = max_difference(reference, merged_logits)
    reference_name = "base (fp32, de-quantized) + adapter" if quantized_base else "base (fp32) + adapter"
    if not diff <= tolerance:
        hint = ("merge with dtype=fp32, or accept it with tolerance=..." if dtype != "fp32" else
                "the merge is not exact; check that the adapter and base belong together")
        raise UsageError(f"the merged model ({dtype}) differs from {reference_name} by max |logit diff| {diff:.3g} "
                         f"> tolerance {tolerance:g} on {len(probe.batches) * PROBE_BATCH_SIZE} probe sequences; "
                         f"nothing written; {hint}")

    q_error, q_how = (None, "")
    if quantized_base:
        q_error, q_how = quantization_error(adapter, base, cls, kwargs, probe, merged_logits)

    import peft

    facts = {
        "base_model": base, "base_chosen": base_chosen, "adapter": str(adapter.path), "adapter_chosen": adapter.chosen,
        "peft_type": adapter.peft_type, "regime": regime, "objective": objective.value, "labels": labels,
        "model_class": type(merged).__name__, "dtype": dtype, "quantized_base": quantized_base,
        "dequantized": quantized_base, "merged_modules": len(layers), "merged_module_names": layers,
        "heads_kept": kept, "reference": reference_name, "max_abs_logit_diff": diff, "tolerance": tolerance,
        "probe": {"batches": len(probe.batches), "batch_size": PROBE_BATCH_SIZE, "length": probe.length,
                  "seed": int(cfg.seed)},
        "quantization_error": q_error, "quantization": q_how or None,
        "base_fingerprint_matches": same_base, "output_dir": str(out), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    removed: List[str] = []

    append_eos = bool(adapter.record.get("append_eos")) and not encoder
    padding_side = adapter.record.get("padding_side", "right")
    # What the model needs to be used as trained travels with it: ftk reads ftk_finetune.json, plain transformers
    # the tokenizer (it appends the eos a decoder classifier reads its class from, and pads on the trained side).
    record = {**adapter.record, "objective": objective.value, "labels": labels, "append_eos": append_eos,
              "padding_side": padding_side, "quantized_base": False, "merged_from": str(adapter.path),
              "adapter": None}
    from ftk.data.tokenizer import as_trained

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        as_trained(tokenizer, append_eos, padding_side).save_pretrained(tmp)
        removed.extend(clean_config(tmp / "config.json"))
        runs.write_json(tmp / "ftk_finetune.json", record)
        files = sorted(p.name for p in tmp.iterdir()) + ["merge.json"]
        runs.write_json(tmp / "merge.json", {**facts, "config_keys_removed": removed, "files": files})

    write_atomically(out, fill)

    heads = f" + {', '.join(kept)} kept whole" if kept else ""
    rows = [("base", base), ("adapter", str(adapter.path)), ("regime", f"{regime} ({objective.value})"),
            ("dtype", dtype + (", de-quantized base (not 4-bit)" if quantized_base else "")),
            ("merged modules", f"{len(layers)} {KIND.get(adapter.peft_type, adapter.peft_type)} layers{heads}"),
            ("max |logit diff|", f"{diff:.2e} (tolerance {tolerance:.0e})"),
            ("compared with", reference_name)]
    if quantized_base:
        rows.append(("vs 4-bit-trained model", f"{q_error:.2e} = quantization error" if q_error is not None else q_how))
    rows += [("time", runs.format_duration(time.time() - started)), ("output dir", str(out))]
    if quantized_base:
        say("QLoRA adapter: merged into the de-quantized (full-precision) base, not into 4-bit weights; the merged "
            "model's difference to the 4-bit-trained model is the quantization error, not a merge error"
            + (f": max |logit diff| {q_error:.2e} ({q_how})" if q_error is not None else f" ({q_how})"))
    from ftk.paths import override

    runs.print_summary(f"ftk merge-adapter: {out}", rows,
                       [f"ftk evaluate {override('model.name_or_path', out)} data.path=<test data>"])
    return facts


def _has_tokenizer(path: Path) -> bool:
    from ftk.data.tokenizer import TOKENIZER_FILES

    return any((path / f).is_file() for f in TOKENIZER_FILES)


def _peft_leftovers(model: Any) -> List[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return [n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
