"""Run a recipe's Hydra entry point and turn every user error into one line and exit code 2.

Hydra normally prints a multi-line message and exits 1. With HYDRA_FULL_ERROR=1 it re-raises
instead, so the exception reaches us here: composition errors (unknown key, wrong type, unknown
group option, missing value) and our own UsageError become `ftk: error: ...`; bugs keep their traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

from ftk.errors import FAILURES, NumericError, Preempted, UsageError


def schema_keys(schema: type, dotted: str) -> Optional[List[str]]:
    """Valid keys at the parent of `dotted` in a dataclass schema, or None when unknown."""
    node = schema
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        f = fields[part]
        node = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.type  # type: ignore[misc]
        node = type(node) if not isinstance(node, type) else node
    if not dataclasses.is_dataclass(node):
        return None
    return [f.name for f in dataclasses.fields(node)]


def one_line(exc: BaseException, schema: Optional[type]) -> str:
    """The shortest message that names the bad key or option and what would be valid."""
    text = str(exc).strip()
    override = getattr(exc, "override", None)  # hydra.errors.OverrideParseException: the lexer/parser refused it
    if override is not None:
        return unparsable(override)
    # Unknown group option: "Could not find 'model/gpt-tin'\n\nAvailable options in 'model':\n\ta\n\tb\nConfig..."
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if found:
        group, option = found.groups()
        listed = text.split("Available options", 1)[1].split("Config search path", 1)[0] if (
            "Available options" in text) else ""
        options = [o for o in re.findall(r"^\t(\S+)$", listed, flags=re.M) if not o.endswith("schema")]
        choices = f"; choose one of: {', '.join(options)}" if options else ""
        return f"unknown option '{option}' for {group}{choices}"
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    detail = str(cause).strip()
    full_key = re.search(r"full_key:\s*(\S+)", detail)
    key = full_key.group(1) if full_key else None
    first = detail.splitlines()[0] if detail else type(cause).__name__
    if key and ("not in" in first or "not in struct" in detail):
        # the node's own schema when OmegaConf names it (a regime's settings), else found from the primary one
        node_type = getattr(cause, "object_type", None)
        valid = ([f.name for f in dataclasses.fields(node_type)] if dataclasses.is_dataclass(node_type)
                 else schema_keys(schema, key) if schema else None)
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return f"unknown config key '{key}'{hint}"
    if key and "Missing mandatory value" in detail:
        return f"{key} is required: pass {key}=..."
    if key:
        return f"{key}: {first}"
    return text.splitlines()[0] if text else type(exc).__name__


def unparsable(override: str) -> str:
    """Hydra's grammar takes only plain ASCII words, numbers and paths unquoted: anything else (accents,
    spaces, brackets, quotes in a path) must be quoted inside the override, and the shell needs it kept."""
    from ftk.paths import override as quoted

    key, sep, value = override.partition("=")
    if not sep:
        return f"cannot parse the override '{override}'; write it as key=value"
    return (f"cannot parse the value of {key}: quote it, as in {quoted(key, value)} (the outer quotes keep the "
            "inner ones from the shell)")


def hydra_flag(overrides: List[str], *names: str) -> bool:
    return any(o in names or any(o.startswith(n + "=") for n in names) for o in overrides)


READ_ONLY_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--package", "-p")


def refuse_unwritable_run_dir(overrides: List[str]) -> Optional[str]:
    """Hydra creates the run (or sweep) folder and writes .hydra/ into it before a recipe runs: a path that
    is a file, or lies in a read-only folder, is refused here with one line instead of Hydra's traceback."""
    if hydra_flag(overrides, *READ_ONLY_FLAGS):
        return None
    from ftk.errors import UsageError
    from ftk.paths import require_writable_dir

    multirun = hydra_flag(overrides, "-m", "--multirun")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("-"))
    path = given.get(key)
    if path is not None and not path.strip().strip("'\""):  # Hydra would write .hydra/ and logs into the cwd
        return f"{key} is empty; pass {key}=<a new folder for this run>"
    if path and not multirun and _foreign(Path(path).expanduser()):
        return (f"{key}={path} already holds files that are not an ftk run; pass {key}=<a new or empty folder> "
                "(ftk writes .hydra/, logs and results there)")
    what = f"{key}={path}" if path else "the run folder runs/"
    try:
        require_writable_dir(Path(path) if path else Path("runs"), what,
                             f"pass {key}=<a folder you can write to>"
                             + ("" if path else ", or run ftk from a writable folder"))
    except UsageError as exc:
        return str(exc)
    return None


RUN_MARKERS = (".hydra", "environment.json", "checkpoints", "final", "metrics.jsonl", "metrics.json",
               "pretrain.log", "finetune.log", "evaluate.log", "estimate.log")  # + Hydra's log of the job


def _foreign(path: Path) -> bool:
    """A non-empty folder that no ftk run has written to (none of what every run leaves, not even the lock or
    pending config of a command that was refused there)."""
    from ftk.run_claim import LOCK_NAME, PENDING_PREFIX

    try:
        if not path.is_dir() or not any(path.iterdir()):
            return False
        return not any((path / m).exists() for m in (*RUN_MARKERS, LOCK_NAME)) and not any(
            p.name.startswith(PENDING_PREFIX) for p in path.iterdir())
    except OSError:
        return False


def refuse_finished_run(overrides: List[str]) -> Optional[str]:
    """Hydra rewrites <run>/.hydra/ before a recipe can look, so a finished run named by
    hydra.run.dir is refused here, before anything in it is touched."""
    if any(o in ("-m", "--multirun") for o in overrides):
        return None
    given = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("-"))
    run_dir = given.get("hydra.run.dir")
    if not run_dir or given.get("train.resume", "never") != "never":
        return None
    path = Path(run_dir).expanduser()
    if (path / "final").is_dir() and (path / "summary.json").is_file():
        return (f"{run_dir} holds a finished run; pick a new hydra.run.dir, or continue it with "
                "train.resume=auto")
    return None


def bracket_lists(overrides: List[str], list_keys) -> List[str]:
    """`eval.shots=0,1,8` is a list for keys that hold one (Hydra would read it as a sweep and refuse it
    outside --multirun), and `eval.tasks=hellaswag` a list of one; in a multirun the user's commas keep their sweep
    meaning."""
    if any(o in ("-m", "--multirun") for o in overrides):
        return overrides
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key in list_keys and value and not value.startswith("[") and value != "null":  # one value: a list of one
            o = f"{key}=[{value}]"
        out.append(o)
    return out


def _hydra_quoted(text: str) -> str:
    """`text` inside Hydra single quotes: a quote and the backslashes right before a quote (or the end) are
    escaped, and `${` too, so a prompt is never read as an interpolation."""
    import re

    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return text.replace("${", "\\${")


def quote_texts(overrides: List[str], text_keys) -> List[str]:
    """`prompts=Once upon a time, there` is one text for keys that hold free text: quoted for Hydra, whose
    grammar would read its comma as a sweep and choke on quotes and brackets inside it. A value that is
    already a Hydra list or quoted string is left as the user wrote it."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key in text_keys and not value.startswith(("[", "'", '"')):
            o = f"{key}='{_hydra_quoted(value)}'"
        out.append(o)
    return out


def run_recipe(recipe: ModuleType, name: str, overrides: List[str]) -> int:
    overrides = bracket_lists(overrides, getattr(recipe, "LIST_KEYS", ()))
    overrides = quote_texts(overrides, getattr(recipe, "TEXT_KEYS", ()))
    from ftk.paths import register_resolvers

    register_resolvers()  # every subcommand's run folder is named with ${ftk_now:...}
    if getattr(recipe, "CLAIMS_RUN_DIR", False) and not any(o.startswith("hydra.output_subdir=") for o in overrides):
        from ftk.run_claim import pending_name

        # Hydra writes the composed config before the recipe can check anything: into a pending folder, which
        # the recipe makes the run's .hydra/ only once its checks pass (ftk/run_claim.py).
        # Next to the user's own overrides: argparse reads one run of them, before or after flags like -m, --cfg.
        at = next((i for i, o in enumerate(overrides) if "=" in o and not o.startswith("-")), len(overrides))
        overrides = overrides[:at] + [f"hydra.output_subdir={pending_name()}"] + overrides[at:]
    refusal = refuse_unwritable_run_dir(overrides) or refuse_finished_run(overrides)
    if refusal:
        print(f"ftk {name}: error: {refusal}", file=sys.stderr)
        return UsageError.exit_code
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # re-raise so that we, not Hydra, decide what the user sees
    from ftk.noise import quiet_libraries

    quiet_libraries()
    saved_argv = sys.argv
    sys.argv = [f"ftk {name}"] + overrides
    FAILURES.clear()
    try:
        recipe.main()
        for exc in FAILURES:  # raised inside jobs (see ftk.errors.reported)
            print(f"ftk {name}: {describe(exc, recipe)}", file=sys.stderr)
        if FAILURES:
            return max(getattr(exc, "exit_code", UsageError.exit_code) for exc in FAILURES)
    except (UsageError, NumericError, Preempted) as exc:
        print(f"ftk {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"ftk {name}: error: {one_line(exc, getattr(recipe, 'SCHEMA', None))}", file=sys.stderr)
        return UsageError.exit_code
    except SystemExit as exc:  # hydra's own --help / --info exit through here
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = saved_argv
        _reset_hydra()
    return 0


def describe(exc: BaseException, recipe: ModuleType) -> str:
    if isinstance(exc, (UsageError, NumericError, Preempted)):
        return str(exc)
    return f"error: {one_line(exc, getattr(recipe, 'SCHEMA', None))}"


def _reset_hydra() -> None:
    """Let the same process run another recipe (tests call main() many times)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
