"""`ftk merge-adapter`: fold a LoRA adapter (and its trained head) into its base, check, and write it.

    adapter (final/ of `ftk finetune regime=lora|qlora`)  +  its base (full precision, never 4-bit)
      -> PeftModel (the reference: probe logits of base + adapter, fp32)
      -> merge_and_unload(): LoRA deltas added into the base weights, modules_to_save (the new head)
         become the plain head modules -> cast to `dtype` -> probe logits again
      -> refused unless max |logit difference| <= tolerance; then written to a temp dir next to
         output_dir and renamed into place, with the tokenizer and merge.json.

This module holds the choices, the compatibility checks and the atomic write; loading base + adapter and the
probe comparison are in ftk/merge_probe.py; the lifecycle is recipes/merge_adapter.py.

The result is a plain Hugging Face model directory: `AutoModelFor*.from_pretrained(dir)` loads it with
no peft installed. Everything the user can get wrong is refused with one line (UsageError, exit 2)
before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ftk import runs
from ftk.errors import UsageError
from ftk.schemas import Objective

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}
# peft methods whose weights merge_and_unload folds into the base (ftk itself writes LORA adapters).
MERGEABLE = ("LORA", "ADALORA", "LOHA", "LOKR", "IA3")
# peft methods that add inputs (virtual tokens) rather than change weights: nothing to merge.
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
KIND = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3"}
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
                    "chat_template.jinja", "tokenizer.model", "README.md")


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


def has_tokenizer(path: Path) -> bool:
    from ftk.data.tokenizer import TOKENIZER_FILES

    return any((path / f).is_file() for f in TOKENIZER_FILES)


def peft_leftovers(model: Any) -> List[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return [n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
