"""`ftk finetune`: adapt a pretrained model to a task under a regime, measuring what it forgets.

Lifecycle: compose + validate -> base model -> tokenizer -> task data -> model with head -> regime
-> (base perplexity on general text) -> train loop -> (fine-tuned perplexity) -> final/ -> summary.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ftk import schemas
from ftk.errors import UsageError, first_line, reported

SCHEMA = schemas.FinetuneConfig
CLAIMS_RUN_DIR = True  # one run at a time per run dir; .hydra/ written only once checks pass
LIST_KEYS = ("logger",)  # `logger=tensorboard,mlflow` means both trackers (a list of group options), not a sweep
schemas.register()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="finetune")
@reported
def main(cfg: DictConfig) -> None:
    from ftk import run_claim, runs

    with run_claim.held(runs.output_dir()):
        finetune(cfg)


def finetune(cfg: DictConfig) -> dict:
    started = time.time()
    schemas.validate_finetune(cfg)
    from ftk.paths import require_writable_cache

    require_writable_cache(cfg.data.cache_dir)  # tokenized data and the embedded task are cached there
    from ftk import regimes
    from ftk.objectives.table import facts as objective_facts
    from ftk.regimes.table import facts
    from ftk.schemas import Objective

    regime, objective = facts(cfg.regime.name), Objective(cfg.objective.name)
    regimes.check_fits(regime.name, objective)
    if cfg.forgetting.l2sp and regime.adapter:
        raise UsageError(f"forgetting.l2sp has no effect under regime={regime.name}: its pretrained weights are "
                         "frozen already; drop forgetting.l2sp or pick a regime that trains them")

    from ftk import finetune_setup as setup, forgetting, resume_check, run_claim, runs, session as sessions, train
    from ftk.models import count_parameters
    from ftk.peak_memory import PeakMemory

    run_dir = runs.output_dir()
    resume_from = runs.resume_point(run_dir, cfg.train.resume)
    base, chosen = setup.choose_base(cfg.model.name_or_path)
    from ftk.base_fingerprint import fingerprint

    # The base's weights, not its path, identify it: merge-adapter and evaluate check an adapter's base by this.
    base_fingerprint = None if cfg.model.random_init else fingerprint(base)
    settings = resume_check.settings(cfg, **{"model.weights (fingerprint)": base_fingerprint})
    changed = resume_check.check(resume_from, settings, cfg.train.accept_changes, run_dir) if resume_from else {}
    run_claim.adopt_config(run_dir)  # every check passed: this config is now the run's
    if cfg.train.lr is None:
        cfg.train.lr = cfg.regime.lr
    # The data is read and tokenized before the process group exists (as `ftk pretrain` prepares its corpus):
    # no collective waits on it, so NCCL's timeout cannot kill the other ranks of a job with a large dataset.
    from ftk.lm_setup import first_rank_say

    sessions.refuse_unsupported(cfg)  # e.g. FSDP with prompt tuning: before reading data or the model
    early_say = first_rank_say()
    early_say(f"run: {run_dir}")  # where metrics.jsonl, checkpoints/ and final/ go: known from the first second
    early_say(f"base model: {base} ({chosen})" + ("; weights re-initialised (model.random_init=true)"
                                                    if cfg.model.random_init else ""))

    from transformers import AutoConfig

    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the config of model '{base}': {first_line(exc)}") from None
    setup.check_fits_model(base, objective, base_config)  # before the data is read: e.g. dpo on an encoder
    tokenizer = setup.load_tokenizer(cfg.model.tokenizer or base, cfg.model.trust_remote_code)
    padding_side = setup.padding_side(objective, regime.name, base_config)
    data = setup.task_data(cfg, objective, tokenizer, base_config, early_say, padding_side)
    session = sessions.start(cfg, run_dir, announce=False)
    say = session.say
    from ftk import planner
    from ftk import cpu_heap

    planned = planner.check_before_launch(cfg, base_config, say, plan=session.plan)  # exit 2 when it cannot fit
    if session.plan.device == "cpu":
        cpu_heap.set_cpu_allocator(planned, say)  # keep freed tensors for reuse unless memory is tight
    model, new_head = setup.load_task_model(cfg, base, objective, regime.name, tokenizer, data.labels, base_config,
                                            session.plan.precision, session.plan.device)
    l2sp = forgetting.L2SP(model, cfg.forgetting.l2sp, new_head) if cfg.forgetting.l2sp else None

    prepared = regimes.apply(regime.name, model, regimes.Context(cfg.regime, objective, new_head))
    model = prepared.model
    setup.trainable_in_float32(model)
    trainable, total = count_parameters(model)
    say(f"regime {regime.name}: {prepared.note}; trainable {trainable:,} of {total:,} parameters "
        f"({trainable / max(total, 1):.2%}); lr {cfg.train.lr:g}")
    if resume_from is not None:
        say(f"resuming from {resume_from}" + (" with train.accept_changes=true: "
                                                  + resume_check.describe(changed) if changed else ""))

    general = None
    lm_objective = setup.lm_objective(base_config)
    base_ppl = None
    held_dtype = setup.weights_dtype(regime.name, session.plan.precision)  # the frozen base's dtype in training
    if cfg.forgetting.data_path:
        general = setup.general_blocks(cfg.forgetting.data_path, tokenizer, cfg.train.seq_len, lm_objective,
                                       cfg.forgetting.max_blocks, cfg.data.cache_dir)
        # The base is read in the dtype the fine-tuned model holds it in (16-bit under LoRA with bf16/fp16) and
        # under the same autocast, so the two perplexities differ by training only, not by rounding.
        base_lm = setup.load_base_lm(base, base_config, cfg.model.trust_remote_code, held_dtype)
        base_ppl = forgetting.perplexity(base_lm.to(session.accelerator.device), general, lm_objective,
                                         session.plan.micro_batch_size, session.accelerator.device, tokenizer,
                                         precision=session.plan.precision)
        del base_lm
        say(f"forgetting: base model perplexity {base_ppl:.2f} on {len(general)} blocks of "
            f"{cfg.forgetting.data_path}")

    replay = None
    if cfg.forgetting.replay_fraction > 0:
        replay = _replay(cfg, base, base_config, model, objective, lm_objective, tokenizer, session, say)

    task_objective = _objective(cfg, tokenizer)
    reference = "none"
    with PeakMemory(session.plan.device) as memory:  # a reference copy is part of what training holds
        if objective_facts(objective).data == "preferences":
            from ftk import preference_setup

            reference = preference_setup.attach_reference(task_objective, cfg, regime, model, base, base_config,
                                                          data, session, base_fingerprint, say)
        result = train.run(model=model, tokenizer=tokenizer, objective=task_objective,
                           source=data.source, train_cfg=cfg.train, plan=session.plan,
                           accelerator=session.accelerator, run_dir=run_dir, resume_from=resume_from,
                           callbacks=prepared.callbacks, extra_loss=forgetting.combine(replay, l2sp),
                           lr_multiplier=prepared.lr_multiplier, started_at=started, settings=settings,
                           apply_changes=bool(changed))

    unwrapped = session.accelerator.unwrap_model(model, keep_torch_compile=False)
    trainable_end, _ = count_parameters(unwrapped)  # gradual_unfreeze / head_then_full end with more than they start
    forgetting_result = {}
    if general is not None:
        view = unwrapped if objective_facts(objective).language_model else \
            forgetting.language_view(unwrapped, setup.load_base_lm(base, base_config, cfg.model.trust_remote_code,
                                                                   held_dtype))
        if hasattr(view, "get_base_model"):  # a soft prompt is the task's; general text is read without it
            view = view.get_base_model()
        # Read as trained, in place and without a float32 copy: QLoRA's 4-bit error is part of its figure.
        tuned_ppl = forgetting.perplexity(view.to(session.accelerator.device), general, lm_objective,
                                          session.plan.micro_batch_size, session.accelerator.device, tokenizer,
                                          precision=session.plan.precision)
        forgetting_result = {"general_text": cfg.forgetting.data_path, "base_ppl": base_ppl,
                             "finetuned_ppl": tuned_ppl, "ppl_change": tuned_ppl - base_ppl,
                             "ppl_ratio": tuned_ppl / base_ppl}
        say(f"forgetting: perplexity {base_ppl:.2f} -> {tuned_ppl:.2f} ({tuned_ppl / base_ppl:.3f}x)")

    test_result = {}
    if data.test is not None:
        from ftk.train import evaluate

        scores = evaluate(model, _objective(cfg, tokenizer), data.test, session.plan.micro_batch_size, 0,
                          cfg.train.seed, session.accelerator)
        test_result = {"test_loss": scores["eval_loss"], "test_accuracy": scores["eval_accuracy"],
                       "test_examples": len(data.test.validation)}
        say(f"test: accuracy {scores['eval_accuracy']:.2%} on {len(data.test.validation):,} examples of "
            f"{cfg.data.test_path}")

    summary = {
        "regime": regime.name, "init": "random" if cfg.model.random_init else "pretrained", "objective": objective.value, "base_model": base, "base_chosen": chosen,
        "parameters": total, "trainable_parameters": trainable, "trainable_share": trainable / max(total, 1),
        "trainable_parameters_end": trainable_end,
        "steps": result.state.step, "tokens_seen": result.state.tokens,
        "wall_time_s": round(time.time() - started, 2), "train_time_s": round(result.state.elapsed, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "first_step_s": result.first_step_s,
        "peak_memory_bytes": memory.peak, "peak_memory_added_bytes": memory.added,
        "peak_memory_reserved_bytes": memory.reserved,
        "planned_memory_bytes": planned.total if planned is not None else None,
        "lr": cfg.train.lr, "labels": data.labels, "data": data.description, "data_stats": data.stats,
        **({"reference": reference} if reference != "none" else {}),
        "train_examples": data.n_train, "validation_examples": data.n_validation,
        "best_step": result.state.extra.get("best_step"), "stopped_early": bool(result.state.extra.get("stopped_early")),
        **{f"final_{k}": v for k, v in result.final_eval.items()}, **test_result,
        "forgetting": forgetting_result, "adapter": prepared.adapter, "plan": session.plan.as_dict(),
    }
    record = {"base_model": base, "init": summary["init"], "regime": regime.name, "objective": objective.value,
              "labels": data.labels,
              "adapter": prepared.adapter, "quantized_base": regime.quantized,
              "append_eos": data.append_eos, "seq_len": cfg.train.seq_len,
              "padding_side": padding_side, "base_fingerprint": base_fingerprint,
              "objective_settings": OmegaConf.to_container(cfg.objective, resolve=True, enum_to_str=True)}
    rows = [("regime", regime.name + (" (from random initialisation)" if cfg.model.random_init else "")),
            ("peak memory (added)", f"{memory.added / 2**20:,.0f} MiB")]
    if test_result:
        rows.append(("test accuracy", f"{test_result['test_accuracy']:.2%}"))
    if forgetting_result:
        rows.append(("general-text perplexity", f"{base_ppl:.2f} -> {forgetting_result['finetuned_ppl']:.2f}"))
    from ftk.data.tokenizer import as_trained

    # final/ is used as trained by plain transformers too: its tokenizer adds the eos, pads on the trained side.
    sessions.finish(session, run_dir, model, as_trained(tokenizer, data.append_eos, padding_side), summary,
                    "finetune", extra_json={"ftk_finetune.json": record},
                    extra_rows=rows, next_steps=_next_steps(run_dir / "final", regime, prepared.adapter))
    return summary


def _next_steps(final: Path, regime, adapter: bool) -> list:
    """The commands that use what the run saved (`regime`: its row in ftk/regimes/table.py)."""
    from ftk.paths import override

    if not adapter:
        return [f"ftk evaluate {override('model.name_or_path', final)} data.path=<test data>"]
    steps = [f"ftk evaluate {override('adapter_path', final)} data.path=<test data>"]
    if regime.mergeable:  # a soft prompt (prompt_tuning) cannot be merged into weights
        steps.append(f"ftk merge-adapter {override('adapter_path', final)}   # one standalone model, no peft needed")
    return steps


def _objective(cfg: DictConfig, tokenizer):
    from ftk.objectives import get_objective

    return get_objective(cfg.objective, tokenizer)


def _replay(cfg, base, base_config, model, objective, lm_objective, tokenizer, session, say):
    """LM loss on general (pretraining) text mixed into every step, through the model's own body."""
    from ftk import finetune_setup as setup, forgetting, runs
    from ftk.objectives.table import facts as objective_facts

    path = cfg.forgetting.replay_path
    if path is None:
        known, pretraining = runs.pretraining_data(Path(base))
        if not known:
            raise UsageError("forgetting.replay_fraction needs forgetting.replay_path=<general text>: the base "
                             "model is not an ftk pretrain run, so its pretraining data is unknown")
        path = pretraining
    blocks = setup.general_blocks(path, tokenizer, cfg.train.seq_len, lm_objective, None, cfg.data.cache_dir)
    if objective_facts(objective).language_model:
        view = model.get_base_model() if hasattr(model, "get_base_model") else model
    else:
        view = forgetting.language_view(model, setup.load_base_lm(base, base_config, cfg.model.trust_remote_code))
    view.to(session.accelerator.device)
    fraction = cfg.forgetting.replay_fraction
    per_step = max(1, round(cfg.train.batch_size * fraction / (1 - fraction)))
    say(f"replay: {per_step} blocks per step from {path or 'the embedded corpus'} ({len(blocks):,} blocks), "
        f"weight {fraction / (1 - fraction):.2f}")
    return forgetting.Replay(view, blocks, per_step, fraction, lm_objective, cfg.train.seed, tokenizer)
