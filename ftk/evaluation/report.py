"""The evaluation's outputs: report.md in the run directory, icl.png for the shots curve, a rich table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple


def _rows(results: Dict[str, Any]) -> List[Tuple[str, str]]:
    rows = [("model", results["model"] + (f" + {results['adapter']}" if results.get("adapter") else ""))]
    if "causal" in results:
        c = results["causal"]
        rows += [("data", results["data"]), ("perplexity", f"{c['perplexity']:.3f}"), ("loss", f"{c['loss']:.4f}"),
                 ("tokens scored", f"{c['tokens']:,}"), ("context / stride", f"{c['context']} / {c['stride']}")]
    if "masked" in results:
        m = results["masked"]
        rows += [("data", results["data"]), ("masked-token accuracy", f"{m['masked_accuracy']:.2%}"),
                 ("masked-token loss", f"{m['masked_loss']:.4f}"), ("masked tokens", f"{m['masked_tokens']:,}")]
        if "pseudo_perplexity" in m:
            rows.append(("pseudo-perplexity", f"{m['pseudo_perplexity']:.3f}"))
    if "compare" in results:
        c = results["compare"]
        rows.append(("compare_to", c["model"]))
        if c.get("ratio") is None:  # another tokenizer: only bits per byte compare
            rows += [("perplexity: compare_to -> this", f"{c['reference_ppl']:.3f} -> {c['this_ppl']:.3f} "
                                                        "(not comparable: other tokenizer)"),
                     ("bits per byte: compare_to -> this", f"{c['reference_bpb']:.4f} -> {c['this_bpb']:.4f} "
                                                           f"({c['bpb_ratio']:.3f}x)")]
        else:
            rows.append(("perplexity: compare_to -> this", f"{c['reference_ppl']:.3f} -> {c['this_ppl']:.3f} "
                                                           f"({c['ratio']:.3f}x)"))
    if "classification" in results:
        c = results["classification"]
        rows += [("data", c["data"]), ("accuracy", f"{c['accuracy']:.2%}"), ("macro-F1", f"{c['macro_f1']:.4f}"),
                 ("examples", f"{c['examples']:,}")]
        rows += [(f"  {name}: precision / recall", f"{v['precision']:.3f} / {v['recall']:.3f} (n={v['support']})")
                 for name, v in c["per_class"].items()]
    if "preference" in results:
        p = results["preference"]
        rows += [("data", f"{p['data']} ({p['pairs']:,} pairs)"), ("scored as", p["kind"]),
                 ("pair accuracy", f"{p['accuracy']:.2%}"), ("mean margin", f"{p['margin']:.4f}"),
                 ("baseline: longer response wins", f"{p['longer_wins']:.2%}")]
        if "reference_likelihood_wins" in p:
            rows.append(("baseline: reference log-likelihood", f"{p['reference_likelihood_wins']:.2%}"))
        if p.get("reference"):
            rows.append(("reference", p["reference"]))
    if "icl" in results:
        i = results["icl"]
        rows += [("data", i["data"]), ("chance / majority", f"{i['chance']:.2%} / {i['majority']:.2%}")]
        rows += [(f"{r['shots']}-shot accuracy", f"{r['accuracy']:.2%} (n={r['test_examples']}, "
                                                 f"{r['mean_shots_used']:.1f} shots fit)") for r in i["rows"]]
    if "harness" in results:
        h = results["harness"]
        rows.append(("lm-eval tasks", ", ".join(h["requested"]) + (f" (from {h['include_path']})"
                                                                   if h.get("include_path") else "")))
        rows += [(f"{task}: {metric}", f"{value:.4f}" + (f" ± {row[metric + '_stderr']:.4f}"
                                                        if isinstance(row.get(metric + "_stderr"), float) else ""))
                 for task, row in h["tasks"].items() for metric, value in row.items() if not metric.endswith("_stderr")]
    return rows


def show(results: Dict[str, Any]) -> None:
    from ftk.runs import print_summary

    print_summary(f"ftk evaluate: {results['kind']}", _rows(results))


def write(run_dir: Path, results: Dict[str, Any]) -> List[Path]:
    lines = ["# ftk evaluate", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _rows(results)]
    if "classification" in results:
        c = results["classification"]
        lines += ["", "Confusion matrix (rows: true label, columns: predicted)", "",
                  "| | " + " | ".join(c["labels"]) + " |", "|---|" + "---:|" * len(c["labels"])]
        lines += [f"| {name} | " + " | ".join(map(str, row)) + " |" for name, row in zip(c["labels"], c["confusion"])]
    written = [run_dir / "report.md", run_dir / "metrics.json"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    if "icl" in results and len(results["icl"]["rows"]) > 1:
        written.append(_plot(run_dir / "icl.png", results["icl"]))
    return written


def _plot(path: Path, icl: Dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    shots = [r["shots"] for r in icl["rows"]]
    ax.plot(shots, [r["accuracy"] for r in icl["rows"]], marker="o", label="model")
    ax.axhline(icl["majority"], color="grey", linestyle="--", label="majority class")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("shots in the prompt")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
