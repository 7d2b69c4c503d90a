"""`ftk evaluate eval=harness`: EleutherAI's lm-evaluation-harness on the model ftk loads (a model folder or hub
name, or a base plus a PEFT adapter), so that a checkpoint is compared the way papers and other toolkits
(litgpt, torchtune, axolotl) compare them.

ftk loads the model (ftk.evaluation.loading: adapters, 4-bit bases, a classifier read through its base's LM head)
and hands the instance to lm-eval's HFLM; lm-eval does the rest. `eval.include_path` adds a folder of task YAMLs,
so a local task over local data runs offline. lm-eval is an optional extra, imported only here.

How the harness's bits per byte relate to ftk's perplexity: a `loglikelihood_rolling` task (wikitext-style) scores
each document in non-overlapping windows of the model's length, each window's first token predicted from the last
token of the previous window only. ftk's perplexity with eval.stride = eval.context reads the same windows but does
not score the first token of each later window (it has no history inside its window); its default stride of
context/2 gives every token at least context/2 tokens of history, which reads lower. See the README.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Callable, Dict, List

from ftk.errors import UsageError

SKIPPED = ("alias", "name", "sample_len", "samples")


def require() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("eval=harness needs lm-evaluation-harness, which is not installed: pip install "
                         "'ftk[harness]' (or pip install lm-eval)")


def task_manager(include_path: Any, tasks: List[str]) -> Any:
    """lm-eval's task index (its own tasks plus include_path), with every requested task checked."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).expanduser().is_dir():
        raise UsageError(f"eval.include_path={include_path} is not a folder; pass a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = TaskManager(include_path=str(Path(include_path).expanduser()), include_defaults=False).all_tasks \
            if include_path else []
        hint = (f"; tasks in {include_path}: {', '.join(local[:20]) or 'none'}" if include_path else
                "; a local task needs eval.include_path=<folder of task YAMLs>")
        raise UsageError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint} "
                         "(`lm-eval ls tasks` lists the built-in ones)")
    return manager


def scores(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{task: {metric: value}} from lm-eval's results (`metric,filter` keys; standard errors kept as
    `<metric>_stderr` when computed)."""
    out: Dict[str, Dict[str, Any]] = {}
    for task, values in {**results.get("results", {}), **results.get("groups", {})}.items():
        row: Dict[str, Any] = {}
        for key, value in values.items():
            if key in SKIPPED or value == "N/A" or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric} ({filt})"] = value
        out[task] = row
    return out


def prepare(cfg: Any) -> Any:
    """Everything that can be refused before a model is loaded: lm-eval installed, tasks given and known."""
    require()
    e = cfg.eval
    tasks = list(e.tasks or [])
    if not tasks:
        raise UsageError("eval=harness needs the tasks to run: pass eval.tasks=[hellaswag,arc_easy] (lm-eval task "
                         "names), or a local task with eval.include_path=<folder> eval.tasks=[<its task name>]")
    for name in ("lm_eval", "lm-eval"):  # its per-metric notes and progress are not the user's business
        logging.getLogger(name).setLevel(logging.ERROR)
    return task_manager(e.include_path, tasks)


def evaluate(cfg: Any, target: Any, device: str, say: Callable[[str], None], manager: Any) -> Dict[str, Any]:
    e = cfg.eval
    tasks = list(e.tasks)
    from ftk.evaluation import loading

    model, tokenizer = loading.language_model(target, cfg)
    if loading.is_masked(model):
        raise UsageError("eval=harness needs a causal LM (GPT, Llama); this model is a masked LM")
    model.to(device)
    context, _ = loading.window(cfg, model)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e.batch_size, max_length=context, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=e.num_fewshot,
                                      limit=e.max_examples, log_samples=False, random_seed=e.seed,
                                      numpy_random_seed=e.seed, torch_random_seed=e.seed, fewshot_random_seed=e.seed)
    table = scores(results)
    for task, row in table.items():
        say(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.endswith("_stderr")))
    return {"harness": {"tasks": table, "requested": tasks, "include_path": e.include_path,
                        "num_fewshot": e.num_fewshot, "limit": e.max_examples, "context": context,
                        "n_samples": results.get("n-samples", {}), "lm_eval_version": lm_eval.__version__
                        if hasattr(lm_eval, "__version__") else _version()}}


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
