"""`ftk pretrain`: train a transformer on unlabeled text with a causal or masked LM objective.

Lifecycle: compose + validate -> tokenizer -> data -> model -> train loop -> save final/ -> summary.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from ftk import schemas
from ftk.errors import reported

SCHEMA = schemas.PretrainConfig
CLAIMS_RUN_DIR = True  # one run at a time per run dir; .hydra/ written only once checks pass
LIST_KEYS = ("logger",)  # `logger=tensorboard,mlflow` means both trackers (a list of group options), not a sweep
schemas.register()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="pretrain")
@reported
def main(cfg: DictConfig) -> None:
    from ftk import run_claim, runs

    with run_claim.held(runs.output_dir()):
        pretrain(cfg)


def pretrain(cfg: DictConfig) -> dict:
    started = time.time()
    schemas.validate(cfg)
    from ftk.paths import require_writable_cache

    require_writable_cache(cfg.data.cache_dir)  # the tokenizer and token blocks are cached there

    from ftk import lm_setup, resume_check, run_claim, runs, session as sessions, train
    from ftk.models import count_parameters

    lm_setup.check_pretrained(cfg)
    run_dir = runs.output_dir()
    resume_from = runs.resume_point(run_dir, cfg.train.resume)
    settings = resume_check.settings(cfg)
    changed = resume_check.check(resume_from, settings, cfg.train.accept_changes, run_dir) if resume_from else {}
    run_claim.adopt_config(run_dir)  # every check passed: this config is now the run's
    # The data is prepared before the process group exists: one process per cache location tokenizes while the
    # others poll its lock file, so no collective (and no NCCL timeout) waits on a long preparation.
    sessions.refuse_unsupported(cfg)  # e.g. FSDP with prompt tuning: before reading data or the model
    early_say = lm_setup.first_rank_say()
    early_say(f"run: {run_dir}")  # where metrics.jsonl, checkpoints/ and final/ go: known from the first second
    data_started = time.time()
    corpus = lm_setup.load_text(cfg, early_say)
    tokenizer, tokenizer_fp = lm_setup.tokenizer_for(cfg, corpus, resume_from, early_say)
    blocks_started = time.time()
    packed = lm_setup.pack(cfg, corpus, tokenizer, tokenizer_fp, early_say).packed
    data_s = {"corpus_and_tokenizer_s": round(blocks_started - data_started, 2),
              "blocks_s": round(time.time() - blocks_started, 2)}  # the token cache's lookup, or its preparation
    session = sessions.start(cfg, run_dir, announce=False)
    say = session.say
    from ftk import planner
    from ftk import cpu_heap

    planned = planner.check_before_launch(cfg, None, say, plan=session.plan)  # exit 2 when it cannot fit
    if session.plan.device == "cpu":
        cpu_heap.set_cpu_allocator(planned, say)  # keep freed tensors for reuse unless memory is tight
    objective_name = cfg.objective.name

    model = lm_setup.model_for(cfg, tokenizer, resume_from, say)
    trainable, total = count_parameters(model)
    say(f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters; objective {objective_name}; "
        f"{session.plan.precision} on {session.plan.device} x{session.plan.world_size}")
    if resume_from is not None:
        say(f"resuming from {resume_from}" + (" with train.accept_changes=true: "
                                                  + resume_check.describe(changed) if changed else ""))

    from ftk.peak_memory import PeakMemory

    with PeakMemory(session.plan.device) as peak:
        result = train.run(model=model, tokenizer=tokenizer, objective=lm_setup.objective_for(cfg, tokenizer),
                           source=train.BlockSource(packed.train, packed.validation), train_cfg=cfg.train,
                           plan=session.plan, accelerator=session.accelerator, run_dir=run_dir,
                           resume_from=resume_from, started_at=started, settings=settings,
                           apply_changes=bool(changed))

    summary = {
        "objective": objective_name, "parameters": total, "trainable_parameters": trainable,
        "steps": result.state.step, "tokens_seen": result.state.tokens,
        "wall_time_s": round(time.time() - started, 2), "train_time_s": round(result.state.elapsed, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "first_step_s": result.first_step_s, **data_s,
        "train_blocks": len(packed.train), "validation_blocks": len(packed.validation),
        "data": corpus.description, **{f"final_{k}": v for k, v in result.final_eval.items()},
        "peak_memory_bytes": peak.peak, "peak_memory_reserved_bytes": peak.reserved,
        "planned_memory_bytes": planned.total if planned is not None else None,
        "plan": session.plan.as_dict(),
    }
    from ftk.paths import override

    final = override("model.name_or_path", run_dir / "final")
    sessions.finish(session, run_dir, model, tokenizer, summary, "pretrain", next_steps=[
        f"ftk finetune {final} data.path=<task.jsonl>   # adapt it to a task",
        f"ftk evaluate {final} data.path=<held-out text>   # perplexity on other text"])
    return summary
