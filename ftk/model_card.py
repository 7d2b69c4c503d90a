"""README.md model cards for final/ and merged models, in the Hugging Face format (YAML metadata + markdown).

huggingface_hub's ModelCardData renders the metadata (base_model, library_name, pipeline_tag, datasets, tags and the
final metrics as a model-index), so the card is what the Hub and `ModelCard.load` read. The body says how the model
was made (the command, the composed config, the data and its fingerprint, the training figures, forgetting when
measured), how to load it in plain transformers/peft, and how to publish it with `hf upload`.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

# objective -> (pipeline tag, transformers Auto class)
PIPELINES = {"clm": ("text-generation", "AutoModelForCausalLM"), "sft": ("text-generation", "AutoModelForCausalLM"),
             "mlm": ("fill-mask", "AutoModelForMaskedLM"),
             "classification": ("text-classification", "AutoModelForSequenceClassification")}
# summary.json key -> (metric type for the model-index, row label)
METRICS = (("final_eval_loss", "loss", "validation loss"), ("final_eval_ppl", "perplexity", "validation perplexity"),
           ("final_eval_accuracy", "accuracy", "validation accuracy"), ("test_accuracy", "accuracy", "test accuracy"))


def command(run_dir: Path, task: str) -> str:
    """The command that made the run, from Hydra's record of its overrides (minus ftk's own bookkeeping)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides: List[str] = []
    if path.is_file():
        import yaml

        overrides = [o for o in (yaml.safe_load(path.read_text()) or []) if not o.startswith("hydra.output_subdir=")]
    return " ".join(["ftk", task] + [shlex.quote(o) for o in overrides])


def data_fingerprint(path: Optional[str], cache_dir: Optional[str] = None, embedded_task: bool = False) -> Optional[str]:
    """sha256 of the data files' contents (a local file or folder, or the embedded corpus or task); None for hub
    data, whose name, config and split identify it."""
    from ftk.data import sources

    files: List[Path] = []
    if path is None:
        from ftk.data.corpus import embedded_corpus_path, embedded_task_paths
        from ftk.data.lm import cache_root

        root = cache_root(cache_dir)
        files = list(embedded_task_paths(root)) if embedded_task else [embedded_corpus_path(root)]
    elif sources.is_local(path) and Path(path).expanduser().exists():
        files = sources.list_files(path)
    if not files or not all(Path(f).is_file() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _hub_model(name: Optional[str]) -> Optional[str]:
    """A base model name the Hub can link to (a local folder is not one)."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return None
    return name


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e3 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(*, name: str, objective: str, adapter: bool, base_model: Optional[str], datasets: List[str],
           tags: List[str], metrics: List[Tuple[str, str, float]], data_name: str, sections: List[str]) -> Any:
    """A ModelCard: metadata by huggingface_hub, body from `sections` (markdown)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    pipeline_tag = PIPELINES.get(objective, ("text-generation", ""))[0]
    data = ModelCardData(
        base_model=base_model, library_name="peft" if adapter else "transformers", pipeline_tag=pipeline_tag,
        datasets=datasets or None, tags=["ftk", *tags], model_name=name,
        eval_results=[EvalResult(task_type=pipeline_tag, dataset_type=datasets[0] if datasets else "local",
                                 dataset_name=data_name[:200], dataset_split="validation" if "test" not in label
                                 else "test", metric_type=metric_type, metric_name=label, metric_value=value)
                      for metric_type, label, value in metrics] or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _table(rows: List[Tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _usage(objective: str, adapter: bool, base: Optional[str], labels: Optional[List[str]]) -> str:
    cls = PIPELINES.get(objective, ("", "AutoModelForCausalLM"))[1]
    head = f", num_labels={len(labels)}" if labels and objective == "classification" else ""
    lines = ["```python", f"from transformers import AutoTokenizer, {cls}"]
    if adapter:
        lines += ["from peft import PeftModel", "",
                  f'base = {cls}.from_pretrained("{base or "<base model>"}"{head})',
                  'model = PeftModel.from_pretrained(base, "<this folder or repo id>")']
    else:
        lines += ["", f'model = {cls}.from_pretrained("<this folder or repo id>")']
    lines += ['tokenizer = AutoTokenizer.from_pretrained("<this folder or repo id>")']
    if objective in ("clm", "sft"):
        lines += ['print(tokenizer.decode(model.generate(**tokenizer("The", return_tensors="pt"), '
                  'max_new_tokens=20)[0]))']
    lines.append("```")
    return "\n".join(lines)


PUBLISH = ("## Publish\n\nThe folder is a complete Hugging Face model repository (this README is its card). "
           "Upload it with the standard command (log in once with `hf auth login`):\n\n"
           "```bash\nhf upload <user>/<model-name> {folder} . --repo-type model\n```")


def for_run(final: Path, run_dir: Path, task: str, summary: Dict[str, Any], record: Optional[Dict[str, Any]]) -> Path:
    """README.md in `final` (written before final/ is put in place) for a pretrain or finetune run."""
    from omegaconf import OmegaConf

    cfg_path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path) if cfg_path.is_file() else OmegaConf.create({})
    record = record or {}
    objective = str(summary.get("objective") or record.get("objective") or "clm")
    adapter = bool(summary.get("adapter"))
    base = record.get("base_model") or summary.get("base_model")
    data_cfg = cfg.get("data") or {}
    path = data_cfg.get("path")
    from ftk.data import sources

    hub = [path] if path and not sources.is_local(str(path)) else []
    fingerprint = None if hub else data_fingerprint(path, data_cfg.get("cache_dir"),
                                                    embedded_task=objective == "classification")
    metrics = [(t, label, float(summary[k])) for k, t, label in METRICS if isinstance(summary.get(k), (int, float))]
    figures = [("steps", summary.get("steps")), ("tokens seen", summary.get("tokens_seen")),
               ("parameters (trainable)", f"{summary.get('parameters', 0):,} ({summary.get('trainable_parameters', 0):,})"),
               ("wall time (s)", summary.get("wall_time_s")), ("tokens/s (training)", summary.get("tokens_per_s")),
               *[(label, value) for _, label, value in metrics]]
    regime = summary.get("regime")
    heading = f"# {run_dir.name}\n\n" + (
        f"{'A ' + regime + ' fine-tune' if regime else 'A model pretrained from scratch'} "
        f"({objective}) made with ftk by:\n\n```bash\n{command(run_dir, task)}\n```")
    sections = [heading, "## Training figures\n\n" + _table([(k, _figure(v)) for k, v in figures if v is not None])]
    data_rows = [("data", summary.get("data") or path or "embedded corpus"), ("data.path", path),
                 ("data.validation_path", data_cfg.get("validation_path")), ("fingerprint", fingerprint)]
    sections.append("## Data\n\n" + _table([(k, f"`{v}`" if k == "fingerprint" else str(v))
                                            for k, v in data_rows if v is not None]))
    forgetting = summary.get("forgetting") or {}
    if forgetting:
        sections.append("## Forgetting\n\nPerplexity on general text (`" + str(forgetting["general_text"]) + "`) "
                        "before and after fine-tuning:\n\n" + _table([
                            ("base model", f"{forgetting['base_ppl']:.3f}"),
                            ("fine-tuned", f"{forgetting['finetuned_ppl']:.3f}"),
                            ("ratio", f"{forgetting['ppl_ratio']:.3f}x")]))
        metrics.append(("perplexity", "general-text perplexity after fine-tuning", float(forgetting["finetuned_ppl"])))
    if (run_dir / "curves.png").is_file():
        sections.append(f"Curves of the run: `{run_dir / 'curves.png'}` (not part of this folder).")
    sections.append("## Use\n\n" + _usage(objective, adapter, base, summary.get("labels") or record.get("labels")))
    sections.append(PUBLISH.format(folder=run_dir / "final"))
    sections.append("## Configuration\n\nThe composed Hydra config of the run:\n\n```yaml\n"
                    + OmegaConf.to_yaml(cfg).rstrip() + "\n```")
    tags = [t for t in (objective, regime, task) if t]
    card = render(name=run_dir.name, objective=objective, adapter=adapter, base_model=_hub_model(base),
                  datasets=[str(h) for h in hub], tags=tags, metrics=metrics,
                  data_name=str(summary.get("data") or path or "embedded corpus"), sections=sections)
    card.save(final / "README.md")
    return final / "README.md"


def for_merge(out: Path, facts: Dict[str, Any], adapter_card: Optional[Path]) -> Path:
    """README.md of a merged model: what was merged into what, checked how, and the adapter's own card below."""
    objective = facts["objective"]
    base = facts["base_model"]
    name = Path(facts["output_dir"]).name  # `out` is the temporary folder renamed into place once complete
    sections = [f"# {name}\n\nThe {facts['peft_type']} adapter `{facts['adapter']}` merged into `{base}` by "
                "`ftk merge-adapter`: a standalone model, no peft needed.",
                "## Merge\n\n" + _table([
                    ("base", f"`{base}`"), ("adapter", f"`{facts['adapter']}`"), ("regime", str(facts["regime"])),
                    ("dtype", facts["dtype"]), ("merged modules", str(facts["merged_modules"])),
                    ("max abs logit difference, merged vs base + adapter",
                     f"{facts['max_abs_logit_diff']:.2e} (tolerance {facts['tolerance']:.0e})")]),
                "## Use\n\n" + _usage(objective, False, None, facts.get("labels")),
                PUBLISH.format(folder=facts["output_dir"])]
    metrics: List[Tuple[str, str, float]] = []
    tags = [objective, str(facts["regime"]), "merged"]
    if adapter_card is not None and adapter_card.is_file():
        from huggingface_hub import ModelCard

        trained = ModelCard.load(adapter_card)
        metrics = [(r.metric_type, r.metric_name or r.metric_type, r.metric_value)
                   for r in (trained.data.eval_results or [])]
        sections.append("## How the adapter was trained (its own card)\n\n" + trained.text.replace("\n# ", "\n### "))
    card = render(name=name, objective=objective, adapter=False, base_model=_hub_model(base), datasets=[],
                  tags=tags, metrics=metrics, data_name="the adapter's validation data", sections=sections)
    card.save(out / "README.md")
    return out / "README.md"
