"""`ftk merge-adapter`: merge a LoRA (or QLoRA) adapter into its base; write a standalone Hugging Face model.

Lifecycle: compose + validate -> which adapter, base, output -> refusals (not an adapter, prompt tuning,
output not empty, wrong base) -> base + adapter (full precision) -> probe logits -> merge_and_unload ->
probe logits of the merged model in the requested dtype -> refuse if they differ by more than the
tolerance -> write to a temp dir next to output_dir, rename -> merge.json and the summary table.
The steps it calls (choices, compatibility checks, probes, the atomic write) are in ftk/merge.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

import hydra
from omegaconf import DictConfig

from ftk import runs, schemas
from ftk.errors import UsageError, first_line, reported

SCHEMA = schemas.MergeConfig
schemas.register_merge()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="merge-adapter")
@reported
def main(cfg: DictConfig) -> None:
    try:
        merge_adapter(cfg)
    finally:
        runs.drop_empty_run_dir()


def merge_adapter(cfg: DictConfig) -> Dict[str, Any]:
    """The lifecycle of `ftk merge-adapter`; returns the facts written to merge.json."""
    from ftk import merge as lib, merge_probe
    from ftk.hardware import torch_dtype

    started = time.time()
    dtype, tolerance = lib.check_settings(cfg)
    from rich.console import Console

    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading and saving take seconds; our lines say what
    console = Console(stderr=True, highlight=False, soft_wrap=True)  # paths stay whole, greppable
    say = console.print

    adapter = lib.choose_adapter(cfg.adapter_path)
    lib.refuse_unmergeable(adapter)
    out, out_chosen = lib.choose_output(cfg.output_dir, adapter)
    base, base_chosen = lib.choose_base(cfg.model.name_or_path, adapter)
    protected = [adapter.path] + ([Path(base).expanduser().resolve()] if Path(base).expanduser().exists() else [])
    lib.refuse_output(out, bool(cfg.overwrite), protected)
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
    lib.refuse_other_shape(adapter, base, base_config, trust)
    tokenizer = setup.load_tokenizer(str(adapter.path) if lib.has_tokenizer(adapter.path) else base, trust)
    lib.refuse_other_vocabulary(adapter, base, tokenizer, trust)
    from ftk import base_fingerprint

    same_base = base_fingerprint.check(adapter.path, adapter.record, base, bool(cfg.allow_other_base), say)

    objective = lib.objective_of(adapter, base_config)
    from ftk.objectives.table import facts as objective_facts

    # a classifier's labels, or a reward model's one score ("reward"): the head has a row per label
    labels = lib.labels_of(adapter) if objective_facts(objective).head == "sequence_classification" else []
    encoder = setup.is_encoder(base_config)
    cls = setup.auto_class(objective)
    kwargs = merge_probe.load_kwargs(objective, labels, tokenizer, trust)
    quantized_base = bool(adapter.record.get("quantized_base"))
    regime = adapter.record.get("regime") or adapter.peft_type.lower()
    say(f"base: {base} ({base_chosen}), as {cls.__name__} in fp32"
        + (" - de-quantized: the adapter was trained on a 4-bit copy of it (QLoRA); it is merged into the "
           f"full-precision weights, written in {dtype}, never into 4-bit weights" if quantized_base else ""))

    model, new_params = merge_probe.load_with_adapter(adapter, base, cls, kwargs, torch.float32)
    vocab_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_rows:
        raise UsageError(f"the adapter's tokenizer has {len(tokenizer):,} tokens but the base {base} has "
                         f"{vocab_rows:,} embeddings" + lib.needs_base(adapter, base))
    layers, kept = merge_probe.tuner_modules(model)
    merge_probe.refuse_random_head(new_params, kept, adapter, base)
    if not layers:
        raise UsageError(f"the adapter {adapter.path} adds no layer to the base {base}: nothing to merge")

    from ftk.models import usable_positions

    positions = usable_positions(base_config)
    length = min(int(cfg.probe_len), int(positions)) if positions else int(cfg.probe_len)
    probe = merge_probe.probe_inputs(tokenizer, vocab_rows, int(cfg.probe_batches), length, int(cfg.seed),
                         bool(adapter.record.get("append_eos")) and not encoder,
                         adapter.record.get("padding_side", "right"))
    reference = merge_probe.probe_logits(model, probe)

    try:
        with merge_probe.quiet():
            merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge: the merged weights would hold NaN/inf
        raise UsageError(f"merging {adapter.path} into {base} failed: {first_line(exc)}; nothing written") from None
    del model
    leftover = lib.peft_leftovers(merged)
    if leftover:
        raise RuntimeError(f"merge_and_unload left peft modules in the model: {leftover[:3]}")
    merged = merged.to(torch_dtype(dtype)).eval()
    merged_logits = merge_probe.probe_logits(merged, probe)
    diff = merge_probe.max_difference(reference, merged_logits)
    reference_name = "base (fp32, de-quantized) + adapter" if quantized_base else "base (fp32) + adapter"
    if not diff <= tolerance:
        hint = ("merge with dtype=fp32, or accept it with tolerance=..." if dtype != "fp32" else
                "the merge is not exact; check that the adapter and base belong together")
        raise UsageError(f"the merged model ({dtype}) differs from {reference_name} by max |logit diff| {diff:.3g} "
                         f"> tolerance {tolerance:g} on {len(probe.batches) * merge_probe.PROBE_BATCH_SIZE} probe sequences; "
                         f"nothing written; {hint}")

    q_error, q_how = (None, "")
    if quantized_base:
        q_error, q_how = merge_probe.quantization_error(adapter, base, cls, kwargs, probe, merged_logits)

    import peft

    facts = {
        "base_model": base, "base_chosen": base_chosen, "adapter": str(adapter.path), "adapter_chosen": adapter.chosen,
        "peft_type": adapter.peft_type, "regime": regime, "objective": objective.value, "labels": labels,
        "model_class": type(merged).__name__, "dtype": dtype, "quantized_base": quantized_base,
        "dequantized": quantized_base, "merged_modules": len(layers), "merged_module_names": layers,
        "heads_kept": kept, "reference": reference_name, "max_abs_logit_diff": diff, "tolerance": tolerance,
        "probe": {"batches": len(probe.batches), "batch_size": merge_probe.PROBE_BATCH_SIZE, "length": probe.length,
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
        removed.extend(lib.clean_config(tmp / "config.json"))
        runs.write_json(tmp / "ftk_finetune.json", record)
        from ftk import model_card

        model_card.for_merge(tmp, {**facts, "output_dir": str(out)}, adapter.path / "README.md")  # README.md
        files = sorted(p.name for p in tmp.iterdir()) + ["merge.json"]
        runs.write_json(tmp / "merge.json", {**facts, "config_keys_removed": removed, "files": files})

    lib.write_atomically(out, fill)

    heads = f" + {', '.join(kept)} kept whole" if kept else ""
    rows = [("base", base), ("adapter", str(adapter.path)), ("regime", f"{regime} ({objective.value})"),
            ("dtype", dtype + (", de-quantized base (not 4-bit)" if quantized_base else "")),
            ("merged modules", f"{len(layers)} {lib.KIND.get(adapter.peft_type, adapter.peft_type)} layers{heads}"),
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
