"""`ftk` command line: a name-to-recipe table, lazy imports, one-line errors.

The subcommand is popped from argv and the rest goes to Hydra unchanged, so every Hydra flag
(`-m`, `--cfg job`, `hydra.run.dir=...`) works. Nothing heavy is imported until a recipe runs:
`ftk --help` must answer in well under a second.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, List, Optional, Tuple

from ftk.errors import EXIT_USAGE

# name -> (module under ftk.recipes, one-line description). A module of None is not built yet.
COMMANDS: Dict[str, Tuple[Optional[str], str]] = {
    "pretrain": ("ftk.recipes.pretrain", "train a transformer from scratch on unlabeled text (CLM or MLM)"),
    "finetune": ("ftk.recipes.finetune", "adapt a pretrained model to a task: full, feature extraction, LoRA, QLoRA, prompt tuning, ..."),
    "evaluate": ("ftk.recipes.evaluate", "perplexity, task accuracy, in-context learning and forgetting of a model or adapter"),
    "merge-adapter": ("ftk.recipes.merge_adapter", "merge a LoRA adapter into its base and write a standalone Hugging Face model"),
    "generate": ("ftk.recipes.generate", "text from a model or base + adapter: sampled or greedy, batched, optionally scored"),
    "prepare": ("ftk.recipes.prepare", "tokenize and pack a pretraining corpus into the cache once, for pretrain runs to start at once"),
    "estimate": ("ftk.recipes.estimate", "memory per device of a run (weights, gradients, optimizer, activations): fits or not, and what would"),
    "plot": ("ftk.recipes.plot", "overlay the curves (loss, validation, lr, tokens/s) of runs or a sweep: ftk plot RUN [RUN ...]"),
}

EXAMPLES = """\
examples:
  ftk pretrain +recipe=gpt-tiny                      # minutes on a laptop CPU, embedded corpus
  ftk pretrain +recipe=bert-small data.path=corpus/  # masked LM on your text
  ftk pretrain +recipe=gpt-tiny --cfg job            # print the composed config, run nothing
  ftk pretrain -m +recipe=gpt-tiny model=gpt-tiny,llama-tiny   # Hydra multirun: one run per model
  ftk finetune regime=lora                           # newest pretrain run, embedded task
  ftk finetune model.name_or_path=runs/pt/final regime=lora data.path=train.jsonl data.validation_path=dev.jsonl
  ftk finetune -m regime=full,feature_extraction,lora,prompt_tuning   # + comparison.md for the sweep
  ftk evaluate model.name_or_path=runs/pt/final data.path=valid.txt
  ftk merge-adapter adapter_path=runs/ft/final output_dir=runs/merged
  ftk generate model.name_or_path=runs/pt/final prompts="Once upon a time" sampling.samples_per_prompt=3
  ftk estimate model.name_or_path=meta-llama/Llama-2-7b-hf regime=qlora hardware=gpu-24gb   # will it fit?

Every subcommand takes Hydra overrides (key=value, group=option, +recipe=NAME) and Hydra flags
(-m/--multirun, --cfg job, --info). `ftk SUBCOMMAND --help` shows its config groups."""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ftk SUBCOMMAND [OVERRIDES...]", "", "subcommands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {text}")
    lines += ["", EXAMPLES]
    return "\n".join(lines)


def fail(message: str) -> int:
    print(f"ftk: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from ftk import __version__

        print(f"ftk {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return fail(f"unknown subcommand '{name}'; choose one of: {', '.join(COMMANDS)} (see ftk --help)")
    module_name, _ = COMMANDS[name]
    if module_name is None:
        return fail(f"'ftk {name}' is not built yet in this version; available: "
                    + ", ".join(n for n, (m, _) in COMMANDS.items() if m))
    recipe = importlib.import_module(module_name)
    if hasattr(recipe, "cli"):  # a plain command (ftk plot): its own arguments, no Hydra
        return recipe.cli(rest)
    from ftk.cli.hydra_errors import run_recipe

    return run_recipe(recipe, name, rest)


def entry() -> None:  # console-script target that exits with main's code
    try:
        sys.exit(main())
    except BrokenPipeError:  # `ftk --help | head`: the reader left; exit quietly like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    entry()
