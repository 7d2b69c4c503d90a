"""The run directory: where a run resumes from, what it records, and the summary it ends with.

    <run>/.hydra/            the composed config (written by Hydra; made the run's only once a command's checks
                             pass, see ftk/run_claim.py)
    <run>/.lock              held (flock) by the one process running in the directory
    <run>/resumes.jsonl      changes a resume applied with train.accept_changes=true (ftk/resume_check.py)
    <run>/environment.json   every version needed to reproduce the run
    <run>/metrics.jsonl      one line per logging step (and per validation)
    <run>/checkpoints/       atomic, resumable checkpoints (see ftk/checkpoint.py)
    <run>/final/             the trained model in Hugging Face format (or a PEFT adapter) + tokenizer
    <run>/summary.json       the figures of the closing table
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ftk import checkpoint
from ftk.errors import UsageError

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "peft", "bitsandbytes",
            "hydra-core", "omegaconf", "numpy", "ftk")


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "final").is_dir() and (run_dir / "summary.json").is_file()


def _say(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # every rank resolves the resume point; one says so
        print(text, file=sys.stderr, flush=True)


def resume_point(run_dir: Path, resume: str, say: Callable[[str], None] = _say) -> Optional[Path]:
    """The checkpoint to continue from, or None for a fresh start; refuses to overwrite a finished run.
    `auto` takes the newest checkpoint whose files all verify, saying which damaged ones it passed over."""
    resume = str(resume)
    if resume == "never":
        if is_finished(run_dir):
            raise UsageError(f"{run_dir} holds a finished run; pick a new hydra.run.dir, or continue it with "
                             "train.resume=auto")
        if checkpoint.step_dirs(run_dir / "checkpoints"):
            raise UsageError(f"{run_dir} holds checkpoints of an unfinished run; continue it with "
                             "train.resume=auto, or pick a new hydra.run.dir")
        return None
    if resume == "auto":
        for path in reversed(checkpoint.step_dirs(run_dir / "checkpoints")):
            problem = checkpoint.damage(path)
            if problem is None:
                return path
            say(f"checkpoint {path} is damaged ({problem}): skipping it, resuming from the newest intact one")
        return None  # nothing (intact) saved yet: start fresh
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").is_file() and not (path / checkpoint.MANIFEST).is_file():
        raise UsageError(f"train.resume={resume} is not a complete checkpoint directory (no trainer_state.json); "
                         "pass train.resume=auto or a checkpoints/step-N folder")
    problem = checkpoint.damage(path)
    if problem is not None:
        raise UsageError(f"train.resume={resume} is a damaged checkpoint ({problem}); pass another "
                         "checkpoints/step-N folder, or train.resume=auto for the newest intact one")
    return path


def newest_final(pattern: str, accept: Callable[[Path], bool] = lambda final: True,
                 prefer: Callable[[Path], bool] = lambda final: False, root: Path = Path("runs")) -> Optional[Path]:
    """final/ of the most recently finished run under root/`pattern` (e.g. "pretrain*") whose final/ passes
    `accept`; among them those passing `prefer` first. Finished = summary.json written (else final/'s own time)."""
    found = [final for final in root.glob(f"{pattern}/**/final") if final.is_dir() and accept(final)]
    if not found:
        return None

    def finished_at(final: Path) -> float:
        summary = final.parent / "summary.json"
        return (summary if summary.is_file() else final).stat().st_mtime

    return max([f for f in found if prefer(f)] or found, key=finished_at)


def newest_pretrained(root: Path = Path("runs")) -> Optional[Path]:
    """final/ of the most recently finished `ftk pretrain` run under the default output folder."""
    return newest_final("pretrain*", lambda final: (final / "config.json").is_file()
                        and (final.parent / "summary.json").is_file(), root=root)


def drop_empty_run_dir() -> None:
    """Hydra creates the run folder before the job; a command that writes elsewhere (merge-adapter) or nothing
    (estimate) removes it again, with the folders above it that Hydra made for it, as long as they are empty."""
    try:
        run_dir = output_dir().absolute()
    except (ValueError, ImportError):
        return
    cwd = Path.cwd().absolute()
    parts = run_dir.relative_to(cwd).parts if run_dir.is_relative_to(cwd) else ()
    for folder in [cwd.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)] or [run_dir]:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            break


def pretraining_data(model_dir: Path) -> Tuple[bool, Optional[str]]:
    """(known, data.path) of the ftk run that produced model_dir; data.path None is the embedded corpus."""
    config = model_dir.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return False, None
    from omegaconf import OmegaConf

    data = OmegaConf.load(config).get("data", {})
    return True, data.get("path")


def git_commit() -> Optional[str]:
    """The commit of ftk's own source, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> Dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "ftk_git_commit": git_commit(), "argv": sys.argv}


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def write_jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    """One JSON object per line, written whole or not at all."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    tmp.replace(path)


def format_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def print_summary(title: str, rows: List[Tuple[str, str]], next_steps: Sequence[str] = ()) -> None:
    """The closing table (stdout), then the commands that usually come next. Without a terminal (a log
    file, a pipe) there is no width to fit, so nothing is cut with an ellipsis; on a terminal long values
    wrap rather than lose their end."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=False, highlight=False, width=100_000)
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for i, command in enumerate(next_steps):
        console.print(("next: " if i == 0 else "      ") + command, soft_wrap=True)
