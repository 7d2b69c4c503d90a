"""Folders ftk will write to, checked before any work starts: one line naming the folder and the fix,
instead of an OSError traceback after minutes of work (or after Hydra has half-created a run)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from ftk.errors import UsageError


def nearest_existing(path: Path) -> Path:
    """`path` itself, or the closest ancestor that exists (what mkdir -p would write into)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_writable_dir(path: Path, what: str, fix: str) -> None:
    """`path` is (or can be created as) a folder this process may write into; else UsageError.

    `what` names the setting ("hydra.run.dir=runs/x", "FTK_CACHE=/c"), `fix` says what to do instead."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} is a file, not a folder; {fix}")
    existing = nearest_existing(path)
    if not existing.is_dir():  # an ancestor is a file: mkdir -p would fail
        raise UsageError(f"{what} cannot be created: {existing} is a file; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == Path(os.path.abspath(path)):
            raise UsageError(f"{what} is read-only; {fix}")
        raise UsageError(f"{what} cannot be created: {existing} is read-only; {fix}")


def safe_dirname(text: str) -> str:
    """One folder name made of `text`: a sweep job's override_dirname may hold paths (`../x`, `/tmp/y`)
    whose slashes would otherwise nest folders or escape the sweep folder."""
    name = text.replace(os.sep, "_").replace("/", "_").replace("\\", "_")
    name = name.lstrip(".") or "_"  # never "." / ".." / a hidden name
    return name[:200]  # file systems cap a name at 255 bytes


def register_resolvers() -> None:
    """`${ftk_dirname:...}` for the sweep subdir and `${ftk_now:...}` for run folders in configs/*.yaml
    (registered before Hydra composes)."""
    from omegaconf import OmegaConf

    from ftk import launch_time

    OmegaConf.register_new_resolver("ftk_dirname", safe_dirname, replace=True)
    # cached per config like Hydra's own `now`: one run folder however often it is read
    OmegaConf.register_new_resolver("ftk_now", launch_time.now, use_cache=True, replace=True)


def cache_root(configured: Optional[str]) -> Path:
    """Where tokenized data, trained tokenizers and the embedded corpus are cached."""
    root = configured or os.environ.get("FTK_CACHE") or "~/.cache/ftk"
    return Path(root).expanduser()


def require_writable_cache(configured: Optional[str]) -> None:
    """Training writes its tokenizer and token blocks to the cache: refuse a read-only one before any work."""
    if configured:
        what = f"data.cache_dir={configured}"
    elif os.environ.get("FTK_CACHE"):
        what = f"FTK_CACHE={os.environ['FTK_CACHE']}"
    else:
        what = f"the cache folder {cache_root(None)}"
    require_writable_dir(cache_root(configured), what,
                         "point FTK_CACHE (or data.cache_dir) at a folder you can write to")


def override(key: str, value: Any) -> str:
    """`key=value` as the user would type it in a shell: plain paths stay bare; anything Hydra's grammar or
    the shell would split (spaces, accents, brackets) is quoted for both."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./-]+", text):
        return f"{key}={text}"
    return "'" + f'{key}="' + text.replace("'", "'\\''") + "\"'"
