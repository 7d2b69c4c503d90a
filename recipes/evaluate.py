"""`ftk evaluate`: perplexity, masked-LM accuracy, classification metrics, in-context learning, forgetting.

Lifecycle: compose -> which model (and adapter) -> which evaluation -> data -> figures -> metrics.json,
report.md (and icl.png) in the run directory, and a table on the terminal.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from ftk.errors import UsageError, reported
from ftk.evaluation import schema

SCHEMA = schema.EvaluateConfig
LIST_KEYS = ("eval.shots", "eval.verbalizers", "eval.tasks")  # `eval.shots=0,1,8` means a list here, not a sweep
schema.register()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="evaluate")
@reported
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


def evaluate(cfg: DictConfig) -> dict:
    started = time.time()
    from ftk import ranges, runs

    ranges.check(cfg)  # numeric fields against the ranges declared in the schema
    from ftk.evaluation import loading
    from ftk.evaluation.schema import EvalKind

    import transformers

    transformers.utils.logging.disable_progress_bar()
    run_dir = runs.output_dir()
    target = loading.resolve_target(cfg)
    e = cfg.eval
    kind = EvalKind(e.kind)
    if kind is EvalKind.auto:
        from ftk.evaluation.preference import PREFERENCE_OBJECTIVES

        kind = EvalKind.classification if target.objective == "classification" else EvalKind.perplexity
        if target.objective in PREFERENCE_OBJECTIVES:
            kind = EvalKind.preference
    from ftk import hardware
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    say = console.print
    hardware.set_threads(cfg.hardware.num_threads)
    device = "cuda" if hardware.resolve(cfg.hardware, 1, 1).device == "cuda" else "cpu"
    manager = None
    if kind is EvalKind.harness:
        from ftk.evaluation import harness

        manager = harness.prepare(cfg)  # lm-eval installed, tasks known: refused before anything is loaded
    say(f"model: {target.describe()}; evaluation: {kind.value}")

    results: dict = {"model": target.model_path, "adapter": target.adapter_path, "kind": kind.value}
    if kind is EvalKind.perplexity:
        results.update(_perplexity(cfg, target, device, say))
    elif kind is EvalKind.classification:
        results.update(_classification(cfg, target, device, say))
    elif kind is EvalKind.preference:
        from ftk.evaluation import preference

        results["preference"] = preference.evaluate(cfg, target, device, say)
    elif kind is EvalKind.harness:
        results.update(harness.evaluate(cfg, target, device, say, manager))
    else:
        results.update(_icl(cfg, target, device, say))
    results["wall_time_s"] = round(time.time() - started, 2)

    from ftk.evaluation import report

    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_json(run_dir / "metrics.json", results)
    written = report.write(run_dir, results)
    report.show(results)
    say("wrote " + ", ".join(str(p) for p in written))
    return results


def _perplexity(cfg, target, device, say) -> dict:
    from ftk.evaluation import loading, perplexity

    model, tokenizer = loading.language_model(target, cfg)
    model.to(device)
    docs, where = loading.general_text(cfg, target)
    out = {"data": where}
    if loading.is_masked(model):
        blocks = loading.mlm_blocks(docs, tokenizer, cfg, model)
        out["masked"] = perplexity.masked_lm(model, blocks, tokenizer, cfg.eval.batch_size, cfg.eval.seed, device,
                                             cfg.eval.pseudo_perplexity)
        say(f"masked LM on {where}: accuracy {out['masked']['masked_accuracy']:.2%}, loss "
            f"{out['masked']['masked_loss']:.4f}")
        if cfg.compare_to:
            other_target = loading.resolve_path(cfg.compare_to)
            if not loading.same_tokenizer(tokenizer, other_target, cfg):
                raise UsageError(f"compare_to={cfg.compare_to} has another tokenizer than {target.model_path}: "
                                 "masked-token perplexities over different tokens are not comparable; compare "
                                 "models that share a tokenizer")
            other, _ = loading.language_model(other_target, cfg, tokenizer_from=target)
            theirs = perplexity.masked_lm(other.to(device), blocks, tokenizer, cfg.eval.batch_size, cfg.eval.seed,
                                          device, False)
            out["compare"] = _change(cfg.compare_to, theirs["masked_perplexity"], out["masked"]["masked_perplexity"])
        return out
    ids = loading.token_stream(docs, tokenizer, cfg.eval.max_tokens)
    context, stride = loading.window(cfg, model)
    out["causal"] = perplexity.causal_perplexity(model, ids, context, stride, cfg.eval.batch_size, device)
    say(f"perplexity on {where}: {out['causal']['perplexity']:.3f} ({out['causal']['tokens']:,} tokens, "
        f"context {context}, stride {stride})")
    if cfg.compare_to:
        other_target = loading.resolve_path(cfg.compare_to)
        if not loading.same_tokenizer(tokenizer, other_target, cfg):
            out["compare"] = _other_tokenizer(cfg, other_target, docs, out["causal"], context, stride, device, say)
            return out
        other, _ = loading.language_model(other_target, cfg, tokenizer_from=target)
        theirs = perplexity.causal_perplexity(other.to(device), ids, context, stride, cfg.eval.batch_size, device)
        out["compare"] = _change(cfg.compare_to, theirs["perplexity"], out["causal"]["perplexity"])
        say(f"compare_to {cfg.compare_to}: perplexity {theirs['perplexity']:.3f} -> "
            f"{out['causal']['perplexity']:.3f} ({out['compare']['ratio']:.3f}x)")
    return out


def _other_tokenizer(cfg, other_target, docs, this: dict, context: int, stride: int, device, say) -> dict:
    """compare_to a model with another tokenizer: a perplexity is per token, and its tokens are others, so the
    ratio of perplexities means nothing. Bits per byte of the same text are comparable: each model reads the
    whole text through its own tokenizer (a cap on tokens would cut the text at different places)."""
    from ftk.evaluation import loading, perplexity

    if cfg.eval.max_tokens:
        raise UsageError(f"compare_to={cfg.compare_to} has another tokenizer: perplexities are not comparable, "
                         "and bits per byte need the whole text read by both models; drop eval.max_tokens "
                         "(or shorten data.path)")
    other, other_tokenizer = loading.language_model(other_target, cfg)
    other_ids = loading.token_stream(docs, other_tokenizer, None)
    other_context = min(context, loading.positions(other))
    theirs = perplexity.causal_perplexity(other.to(device), other_ids, other_context,
                                          min(stride, other_context), cfg.eval.batch_size, device)
    text_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    this["bits_per_byte"] = perplexity.bits_per_byte(this, text_bytes)
    reference_bpb = perplexity.bits_per_byte(theirs, text_bytes)
    say(f"compare_to {cfg.compare_to}: another tokenizer, so perplexities are not comparable (no ratio); bits per "
        f"byte {reference_bpb:.4f} -> {this['bits_per_byte']:.4f}")
    return {"model": cfg.compare_to, "same_tokenizer": False, "reference_ppl": theirs["perplexity"],
            "this_ppl": this["perplexity"], "change": None, "ratio": None, "reference_bpb": reference_bpb,
            "this_bpb": this["bits_per_byte"], "bpb_ratio": this["bits_per_byte"] / reference_bpb}


def _change(other: str, reference: float, this: float) -> dict:
    return {"model": other, "same_tokenizer": True, "reference_ppl": reference, "this_ppl": this,
            "change": this - reference, "ratio": this / reference}


def _classification(cfg, target, device, say) -> dict:
    from ftk.evaluation import classification, loading

    model, tokenizer = loading.classifier(target, cfg)
    model.to(device)
    source, labels, where = loading.labelled_source(cfg, target, tokenizer)
    predicted, gold = classification.predict(model, source, cfg.eval.batch_size, device)
    out = classification.metrics(predicted, gold, labels)
    out["data"] = where
    say(f"classification on {where}: accuracy {out['accuracy']:.2%}, macro-F1 {out['macro_f1']:.4f} "
        f"({out['examples']:,} examples)")
    return {"classification": out}


def _icl(cfg, target, device, say) -> dict:
    from ftk.evaluation import icl, loading

    model, tokenizer = loading.language_model(target, cfg)
    if loading.is_masked(model):
        raise UsageError("eval=icl needs a causal LM (GPT, Llama); this model is a masked LM")
    model.to(device)
    pool, test, labels, where = loading.icl_data(cfg)
    verbalizers = list(cfg.eval.verbalizers) if cfg.eval.verbalizers else labels
    if len(verbalizers) != len(labels):
        raise UsageError(f"eval.verbalizers has {len(verbalizers)} words for {len(labels)} labels "
                         f"({', '.join(labels)}); give one per label, in that order")
    context, _ = loading.window(cfg, model)
    rows = icl.evaluate(model, tokenizer, pool, test, labels, verbalizers, list(cfg.eval.shots), cfg.eval.template,
                        cfg.eval.num_test, cfg.eval.seed, context, device)
    for r in rows:
        say(f"{r['shots']}-shot: accuracy {r['accuracy']:.2%} on {r['test_examples']} test examples")
    majority = max(labels, key=lambda name: sum(1 for _, g in test if g == name))
    return {"icl": {"rows": rows, "labels": labels, "verbalizers": verbalizers, "template": cfg.eval.template,
                    "data": where, "chance": 1 / len(labels),
                    "majority": sum(1 for _, g in test if g == majority) / max(len(test), 1)}}
