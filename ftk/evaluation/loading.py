"""What `ftk evaluate` measures: the model (a directory, a hub name, or a base plus a PEFT adapter) and
the data (given, or the data the run that made the model used)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ftk.errors import UsageError, first_line


@dataclass
class Target:
    model_path: str                      # the model, or the base of the adapter
    adapter_path: Optional[str] = None
    record: Dict[str, Any] = field(default_factory=dict)  # ftk_finetune.json of the fine-tuned model/adapter
    run_dir: Optional[Path] = None       # the ftk run that produced it, when known
    chosen: str = "given"

    @property
    def objective(self) -> Optional[str]:
        if self.record:
            return self.record.get("objective")
        config = Path(self.model_path) / "config.json"
        if config.is_file():
            archs = json.loads(config.read_text()).get("architectures") or []
            if any(a.endswith("ForSequenceClassification") for a in archs):
                return "classification"
        return None

    def describe(self) -> str:
        text = self.model_path + (f" + adapter {self.adapter_path}" if self.adapter_path else "")
        return text + ("" if self.chosen == "given" else f" ({self.chosen})")


def _record(path: Path) -> Dict[str, Any]:
    f = path / "ftk_finetune.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def resolve_path(path: str, chosen: str = "given") -> Target:
    """A model directory, an adapter directory (its base from adapter_config.json), or a hub name."""
    local = Path(path).expanduser()
    if (local / "adapter_config.json").is_file():
        base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UsageError(f"{path} is an adapter that does not name its base; pass model.name_or_path=<base>")
        from ftk.models import check_model_path, check_weight_files

        check_weight_files(local)  # the adapter's own weights
        if Path(base).expanduser().exists():
            check_model_path(base)
        return Target(base, str(local), _record(local), local.parent, chosen)
    if local.exists() or path.startswith((".", "/", "~")):
        from ftk.models import check_model_path

        check_model_path(path)
        return Target(str(local), None, _record(local), local.parent, chosen)
    return Target(path, None, {}, None, chosen)


def resolve_target(cfg: Any) -> Target:
    if cfg.adapter_path:
        adapter = Path(cfg.adapter_path).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            hint = " (it is a full model: pass it as model.name_or_path)" if (adapter / "config.json").is_file() else ""
            raise UsageError(f"adapter_path={cfg.adapter_path} is not a PEFT adapter: no adapter_config.json{hint}")
        target = resolve_path(str(adapter))
        if cfg.model.name_or_path:
            target.model_path = cfg.model.name_or_path
        from ftk.base_fingerprint import check

        check(adapter, target.record, target.model_path, bool(cfg.get("allow_other_base", False)),
              lambda text: print(text, file=sys.stderr))
        return target
    if cfg.model.name_or_path:
        return resolve_path(cfg.model.name_or_path)
    from ftk.runs import newest_final

    # any finished run's final/ (pretrain or finetune; evaluate runs save none)
    newest = newest_final("*", lambda final: (final.parent / "summary.json").is_file())
    if newest is None:
        raise UsageError("no model given and no finished run under ./runs; pass model.name_or_path=<model dir or "
                         "hub name> (and adapter_path=<adapter dir> for an adapter)")
    return resolve_path(str(newest.resolve()), chosen="the newest run")


def _tokenizer(path: str, cfg: Any):
    from ftk.finetune_setup import load_tokenizer

    return load_tokenizer(cfg.model.tokenizer or path, cfg.model.trust_remote_code)


def _with_adapter(model: Any, target: Target) -> Any:
    if not target.adapter_path:
        return model
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, target.adapter_path)
    except (RuntimeError, ValueError) as exc:
        first = first_line(exc, 200)
        raise UsageError(f"the adapter {target.adapter_path} does not fit the base {target.model_path}: {first}; "
                         "pass the base it was trained on as model.name_or_path") from None


def _load(cls: Any, target: Target, cfg: Any, **kwargs: Any) -> Any:
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code, **kwargs}
    try:
        if target.record.get("quantized_base") and target.adapter_path:
            from ftk.regimes.qlora_base import load_4bit_base
            import torch

            return load_4bit_base(target.model_path, cls, torch.bfloat16, **kwargs)  # as it was trained
        return cls.from_pretrained(target.model_path, **kwargs)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UsageError(f"cannot load model '{target.model_path}': {first}") from None


def same_tokenizer(tokenizer: Any, other: Target, cfg: Any) -> bool:
    """Whether `other` reads text with the same ids as `tokenizer` (its own tokenizer, as saved with it)."""
    theirs = _tokenizer(other.adapter_path or other.model_path, cfg)
    return theirs.get_vocab() == tokenizer.get_vocab()


def is_masked(model: Any) -> bool:
    from ftk.finetune_setup import is_encoder

    return is_encoder(model.config)


def language_model(target: Target, cfg: Any, tokenizer_from: Optional[Target] = None) -> Tuple[Any, Any]:
    """The target as a language model: its own LM head, or (a fine-tuned classifier) the base's LM head
    on the fine-tuned body, as `ftk finetune` measures forgetting."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from ftk.finetune_setup import is_encoder

    config = AutoConfig.from_pretrained(target.model_path, trust_remote_code=cfg.model.trust_remote_code)
    lm_cls = AutoModelForMaskedLM if is_encoder(config) else AutoModelForCausalLM
    tokenizer = _tokenizer((tokenizer_from or target).adapter_path or (tokenizer_from or target).model_path, cfg)
    if target.objective == "classification":
        from ftk import forgetting

        body_model, _ = classifier(target, cfg)
        base = target.record.get("base_model") or target.model_path
        lm = forgetting.language_view(body_model, lm_cls.from_pretrained(base))
        return lm.eval(), tokenizer
    model = _with_adapter(_load(lm_cls, target, cfg), target)  # a causal soft prompt is prepended by peft
    return model.eval(), tokenizer


def classifier(target: Target, cfg: Any) -> Tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification

    labels = target.record.get("labels")
    kwargs: Dict[str, Any] = {}
    tokenizer = _tokenizer(target.adapter_path or target.model_path, cfg)
    if target.adapter_path:
        if not labels:
            raise UsageError(f"{target.adapter_path} does not record its labels (no ftk_finetune.json); "
                             "evaluate a model directory with a classification head instead")
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={n: i for i, n in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
    model = _with_adapter(_load(AutoModelForSequenceClassification, target, cfg, **kwargs), target)
    return model.eval(), tokenizer


def _run_config(target: Target) -> Optional[Any]:
    if target.run_dir is None or not (target.run_dir / ".hydra" / "config.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(target.run_dir / ".hydra" / "config.yaml")


def general_text(cfg: Any, target: Target) -> Tuple[List[str], str]:
    """Documents to measure: data.path, or the validation text of the run that made the model."""
    from ftk.data import sources, stream

    if cfg.data.path:
        return sources.text_column(sources.load_records(cfg.data.path), cfg.data.text_column, cfg.data.path), \
            cfg.data.path
    run = _run_config(target)
    if run is not None and run.get("objective", {}).get("name") in ("clm", "mlm"):
        corpus = stream.resolve(run.data, run.train.seed)
        validation = stream.validation_documents(corpus)
        if validation:
            return validation, f"the validation text of {target.run_dir} ({corpus.description})"
    raise UsageError("no text to measure: pass data.path=<text file, folder or hub dataset>")


def token_stream(docs: List[str], tokenizer: Any, limit: Optional[int]):
    import numpy as np

    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + ([eos] if eos is not None else [])
        if limit and len(ids) >= limit:
            break
    return np.asarray(ids[:limit] if limit else ids, dtype=np.int64)


def positions(model: Any) -> int:
    from ftk.models import usable_positions

    return usable_positions(model.config) or 1024


def window(cfg: Any, model: Any) -> Tuple[int, int]:
    context = cfg.eval.context if cfg.eval.context is not None else min(positions(model), 1024)
    if context > positions(model):
        raise UsageError(f"eval.context={context} is larger than the model's {positions(model)} positions")
    stride = cfg.eval.stride if cfg.eval.stride is not None else max(1, context // 2)
    if not 0 < stride <= context:
        raise UsageError(f"eval.stride must be in [1, eval.context={context}], got {stride}")
    return context, stride


def mlm_blocks(docs: List[str], tokenizer: Any, cfg: Any, model: Any):
    from ftk.data import lm

    context = cfg.eval.context or min(positions(model), 512)
    blocks = lm.pack(docs, tokenizer, context, lm.Layout.for_objective("mlm", tokenizer))
    if cfg.eval.max_tokens:
        blocks = blocks[: max(1, cfg.eval.max_tokens // context)]
    if len(blocks) == 0:
        raise UsageError(f"the text holds fewer than {context} tokens; lower eval.context")
    return blocks


def labelled_source(cfg: Any, target: Target, tokenizer: Any):
    """Examples to classify, tokenized as the model was trained (end-of-text, padding side)."""
    from ftk.data.examples import ExampleSource
    from ftk.data.labelled import _records, tokenize

    labels = target.record.get("labels")
    if not labels:
        labels = [name for _, name in sorted(_id2label(target).items())]
    data = cfg.data
    path = data.validation_path or data.path
    if path is None:
        run = _run_config(target)
        if run is not None and (run.data.get("validation_path") or run.data.get("path") is None):
            path = run.data.get("validation_path")
            if path is None:
                from ftk.data import lm
                from ftk.data.corpus import embedded_task_paths

                path = str(embedded_task_paths(lm.cache_root(data.cache_dir))[1])
        if path is None:
            raise UsageError("no data to classify: pass data.path=<jsonl/csv with text and label columns>")
    records = _records(data, path, data.split)
    unknown = sorted({g for _, g in records} - set(labels))
    if unknown:
        raise UsageError(f"{path} has label(s) {', '.join(map(repr, unknown[:5]))} the model does not know "
                         f"(its labels: {', '.join(map(repr, labels[:10]))})")
    if cfg.eval.max_examples:
        records = records[: cfg.eval.max_examples]
    seq_len = target.record.get("seq_len") or 512
    append_eos = bool(target.record.get("append_eos", False))
    examples = tokenize(records, labels, tokenizer, seq_len, append_eos)
    source = ExampleSource([], examples, tokenizer.pad_token_id, target.record.get("padding_side", "right"))
    return source, labels, path


def _id2label(target: Target) -> Dict[int, str]:
    config = json.loads((Path(target.model_path) / "config.json").read_text())
    return {int(k): v for k, v in (config.get("id2label") or {}).items()}


def icl_data(cfg: Any):
    from ftk.data.labelled import _hold_out, _label_order, _records

    data = cfg.data
    if not data.path:
        raise UsageError("eval=icl needs labelled examples: pass data.path=<train.jsonl> (the shots) and "
                         "data.validation_path=<test.jsonl>")
    pool = _records(data, data.path, data.split)
    if data.validation_path:
        test = _records(data, data.validation_path, data.validation_split or data.split)
    else:
        pool, test = _hold_out(pool, data.validation_fraction, cfg.eval.seed)
    labels = sorted({g for _, g in pool}, key=_label_order)
    unknown = sorted({g for _, g in test} - set(labels))
    if unknown:
        raise UsageError(f"the test data has label(s) {', '.join(map(repr, unknown[:5]))} the shots never show")
    return pool, test, labels, f"{data.path} -> {data.validation_path or 'held-out share'}"
