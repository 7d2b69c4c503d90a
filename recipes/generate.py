"""`ftk generate`: samples from a model for prompts given on the command line or in a file.

Lifecycle: compose -> which model (and adapter) -> prompts as the model was trained on them -> batched
generate() with the KV cache -> optional scores -> samples.jsonl (one line per sample) and settings.json
in the run directory, and the samples on the terminal.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig, OmegaConf

from ftk.errors import UsageError, reported
from ftk.generation import schema

SCHEMA = schema.GenerateConfig
TEXT_KEYS = ("prompts",)  # `prompts=Once upon a time, there` is one prompt, not a sweep
schema.register()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="generate")
@reported
def main(cfg: DictConfig) -> None:
    generate(cfg)


def _instruction_format(cfg: DictConfig, target, tokenizer) -> bool:
    from ftk.generation.schema import PromptFormat

    chosen = PromptFormat(cfg.prompt_format)
    if chosen is not PromptFormat.auto:
        return chosen is PromptFormat.instruction
    from ftk.objectives.table import NAMES, facts

    # SFT lays instructions out (chat template or Alpaca); preference data uses string prompts as they are
    # (message lists through the chat template, which the tokenizer check below covers).
    objective = target.record.get("objective")
    tuned_on_instructions = objective in NAMES and facts(objective).data == "instructions"
    return tuned_on_instructions or bool(getattr(tokenizer, "chat_template", None))


def generate(cfg: DictConfig) -> list:
    started = time.time()
    from ftk import hardware, ranges, runs

    ranges.check(cfg)
    from ftk.evaluation import loading
    from ftk.generation import prompts as prompt_files
    from rich.console import Console

    import transformers

    transformers.utils.logging.disable_progress_bar()
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    say = console.print
    prompts = prompt_files.read(cfg.prompts, cfg.prompt_field, cfg.max_prompts)  # bad prompts stop before loading
    target = loading.resolve_target(cfg)
    hardware.set_threads(cfg.hardware.num_threads)
    plan = hardware.resolve(cfg.hardware, cfg.batch_size, 1)
    model, tokenizer = loading.language_model(target, cfg)
    if loading.is_masked(model):
        raise UsageError(f"{target.model_path} is a masked language model (an encoder): it fills in blanks and "
                         "cannot continue text; generate with a causal model (GPT, Llama)")
    # 16-bit weights on a GPU (as trained); on a CPU float32, whose generation is exact and not slower here.
    dtype = hardware.torch_dtype(plan.precision) if plan.device == "cuda" else None
    model = model.to(plan.device, dtype=dtype).eval()
    scorers = []
    if cfg.score_with:
        from ftk.generation import scoring

        paths = [cfg.score_with] if isinstance(cfg.score_with, str) else list(cfg.score_with)
        scorers = [(str(p), scoring.load(str(p), cfg.score_label, cfg, plan.device)) for p in paths]
    reference = None
    if cfg.kl_reference:
        from ftk.generation.logprobs import exact_sampling

        if not exact_sampling(cfg.sampling):
            raise UsageError("kl_reference needs samples from the model's own distribution: sampling.do_sample=true, "
                             "temperature=1, top_p=1, top_k=0, repetition_penalty=1 (else the estimate is biased)")
        ref_target = loading.resolve_path(cfg.kl_reference)
        if not loading.same_tokenizer(tokenizer, ref_target, cfg):
            raise UsageError(f"kl_reference={cfg.kl_reference} reads text with another tokenizer than "
                             f"{target.model_path}; a KL needs both models on the same tokens")
        reference, _ = loading.language_model(ref_target, cfg)
        reference = reference.to(plan.device, dtype=dtype).eval()
    instruction = _instruction_format(cfg, target, tokenizer)
    ids = [prompt_files.token_ids(p, tokenizer, instruction) for p in prompts]
    limit = loading.positions(model)
    too_long = [i for i, row in enumerate(ids) if len(row) + cfg.sampling.max_new_tokens > limit]
    if too_long:
        longest = max(len(ids[i]) for i in too_long)
        raise UsageError(f"{len(too_long)} prompt(s) (the longest {longest} tokens) plus sampling.max_new_tokens="
                         f"{cfg.sampling.max_new_tokens} exceed the model's {limit} positions; lower "
                         "sampling.max_new_tokens or shorten the prompts")
    say(f"model: {target.describe()}; {len(prompts)} prompt(s) x {cfg.sampling.samples_per_prompt} sample(s), "
        f"{'instruction' if instruction else 'raw'} prompts, "
        + ("greedy" if not cfg.sampling.do_sample or cfg.sampling.temperature == 0 else
           f"temperature {cfg.sampling.temperature}, top_p {cfg.sampling.top_p}, top_k {cfg.sampling.top_k or 'off'}")
        + f", on {plan.device}" + (f"; scored by {', '.join(p for p, _ in scorers)}" if scorers else ""))

    from ftk.generation import sampling
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]prompts"), MofNCompleteColumn(), BarColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("generate", total=len(prompts))
        samples = sampling.generate(model, tokenizer, ids, cfg.sampling, cfg.batch_size, plan.device,
                                    lambda n: progress.advance(task, n))
    records = []
    for s in samples:
        prompt = prompts[s.prompt_index]
        completion = tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        records.append({"prompt_index": s.prompt_index, "sample_index": s.sample_index, "prompt": prompt.text,
                        **({"input": prompt.input} if prompt.input else {}), "completion": completion,
                        "new_tokens": len(s.completion_ids), "stopped": s.stopped, **prompt.record})
    if scorers:
        from ftk.generation.schema import ScoreText

        full = ScoreText(cfg.score_text) is ScoreText.full
        texts = [(r["prompt"] + r["completion"]) if full else r["completion"] for r in records]
        for number, (_, scorer) in enumerate(scorers):
            for record, scored in zip(records, scorer.score(texts)):
                if number == 0:
                    record.update(scored)
                if len(scorers) > 1:
                    record.setdefault("scores", []).append(scored["score"])
    if reference is not None:
        from ftk.generation.logprobs import completion_logprobs

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        own = completion_logprobs(model, samples, pad, tokenizer.eos_token_id, plan.device, cfg.batch_size)
        ref = completion_logprobs(reference, samples, pad, tokenizer.eos_token_id, plan.device, cfg.batch_size)
        for record, a, b in zip(records, own, ref):
            record["logprob"], record["ref_logprob"] = a, b

    run_dir = runs.output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": target.model_path, "adapter": target.adapter_path, "prompts": len(prompts),
                "prompt_format": "instruction" if instruction else "raw",
                "sampling": OmegaConf.to_container(cfg.sampling), "batch_size": cfg.batch_size,
                "device": plan.device, "dtype": str(dtype or "float32").replace("torch.", ""),
                "score_with": [p for p, _ in scorers] or None,
                "score": [sc.describe() for _, sc in scorers] or None, "kl_reference": cfg.kl_reference,
                "samples": len(records), "new_tokens": sum(r["new_tokens"] for r in records),
                "wall_time_s": round(time.time() - started, 2)}
    if scorers:
        settings["mean_score"] = sum(r["score"] for r in records) / len(records)
        if len(scorers) > 1:
            settings["mean_scores"] = [sum(r["scores"][i] for r in records) / len(records) for i in range(len(scorers))]
    if reference is not None:
        settings["kl_estimate"] = sum(r["logprob"] - r["ref_logprob"] for r in records) / len(records)
    runs.write_json(run_dir / "settings.json", settings)
    runs.write_jsonl(run_dir / "samples.jsonl", records)
    _show(records, cfg.print_samples, bool(scorers))
    say(f"wrote {len(records)} sample(s), {settings['new_tokens']:,} new tokens in {settings['wall_time_s']} s "
        f"to {run_dir / 'samples.jsonl'}" + (f"; mean score {settings['mean_score']:.4f}" if scorers else "")
        + (f"; KL from the reference {settings['kl_estimate']:.4f} nats per sequence" if reference is not None else ""))
    return records


def _show(records: list, limit, scored: bool) -> None:
    """The samples on stdout (the log goes to stderr): all of them when there are few."""
    shown = records if limit is None and len(records) <= 20 else records[:limit or 0]
    for r in shown:
        head = f"--- prompt {r['prompt_index']}" + (f", sample {r['sample_index']}" if r["sample_index"] else "")
        head += f" ({r['stopped']}" + (f", score {r['score']:.4f})" if scored else ")")
        print(f"{head}\n{r['prompt']}{r['completion']}", flush=True)
