"""The embedded default data: docstrings of the running Python's standard library.

`ftk pretrain` and `ftk finetune` work with no data given and no network: the text comes from the
standard library's own `.py` files, read with `ast` (nothing is imported, nothing is copied into the
repository). Two files are derived from it and cached under `<cache_dir>/corpus/`:

    stdlib-docstrings-py3.X-v1.jsonl   {"text": ...}   one document per module/class/function docstring
    stdlib-task-py3.X-v1.{train,validation}.jsonl
                                       {"text": ..., "label": ...}   which stdlib package a docstring
                                       comes from: a small, balanced classification task

Both are deterministic for a given standard library (sorted files, no randomness), built only when
missing, and written to a temporary file first and then renamed (`os.replace`), so a reader never
sees a half-written file and two processes building at once are harmless. Bump `VERSION` when the
extraction changes so stale caches are not reused.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import inspect
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from ftk.errors import UsageError

VERSION = 1
MIN_DOCSTRING_CHARS = 40       # shorter ones ("Return self.") are noise
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

# The classification task: top-level stdlib packages present in every CPython >= 3.10, topically far
# apart, each with well over 100 docstrings of >= 40 chars (3.11: asyncio 297, email 271, logging 224,
# xml 202, unittest 155, http 123). Every class is capped at the smallest class's count.
TASK_LABELS = ("asyncio", "email", "http", "logging", "unittest", "xml")
TASK_TEXT_CHARS = 400          # a docstring's first ~400 chars: enough to classify, short to train on
MIN_TASK_EXAMPLES_PER_LABEL = 20
VALIDATION_PERCENT = 20        # ~80/20 train/validation split by a stable hash of the text


def _py() -> str:
    return f"py{sys.version_info.major}.{sys.version_info.minor}"


def embedded_corpus_path(cache_dir: Path) -> Path:
    """A .jsonl of the standard library's docstrings ({"text": ...} per line), built on first use."""
    path = Path(cache_dir) / "corpus" / f"stdlib-docstrings-{_py()}-v{VERSION}.jsonl"
    if not path.is_file():
        _write_jsonl(path, ({"text": text} for _, text in _stdlib_docstrings()))
    return path


def embedded_task_paths(cache_dir: Path) -> Tuple[Path, Path]:
    """(train, validation) .jsonl files of {"text", "label"}: which stdlib package a docstring is from."""
    stem = Path(cache_dir) / "corpus" / f"stdlib-task-{_py()}-v{VERSION}"
    train, validation = stem.with_name(stem.name + ".train.jsonl"), stem.with_name(stem.name + ".validation.jsonl")
    if not (train.is_file() and validation.is_file()):
        records = _task_records()
        # Two racing builders write identical bytes, so either's rename is fine.
        _write_jsonl(train, (r for r in records if not _is_validation(r["text"])))
        _write_jsonl(validation, (r for r in records if _is_validation(r["text"])))
    return train, validation


def embedded_task_path(cache_dir: Path) -> Path:
    """The training file of the embedded classification task (see `embedded_task_paths`)."""
    return embedded_task_paths(cache_dir)[0]


# --- extraction ---------------------------------------------------------------------------------


def _stdlib_files() -> List[Tuple[str, Path]]:
    """(relative posix path, file) of the stdlib's .py files, tests and bundled tools left out, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            files.append((rel.as_posix(), path))
    return sorted(files)


def _definitions(tree: ast.AST) -> Iterable[ast.AST]:
    """Modules, classes and functions in source order, also those nested in if/try/with blocks.

    Only statements are visited (never into expressions), which is ~4x faster than `ast.walk`.
    """
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, DEFINITIONS):
            yield node
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.stmt, ast.excepthandler, ast.match_case))]
        stack.extend(reversed(children))


@lru_cache(maxsize=1)
def _stdlib_docstrings() -> Tuple[Tuple[str, str], ...]:
    """(relative path, cleaned docstring) for every docstring of >= MIN_DOCSTRING_CHARS, in a fixed order.

    Identical docstrings (overrides that repeat their base class's text) are kept once, so a held-out
    document never duplicates a training one. Cached per process: the corpus and the task share it.
    """
    seen = set()
    out = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # parsing makes millions of short-lived objects, none cyclic: collections only cost time
    try:
        for rel, path in _stdlib_files():
            _add_docstrings(rel, path, seen, out)
    finally:
        if gc_was_enabled:
            gc.enable()
    if not out:  # e.g. a Python shipped with .pyc files only
        raise UsageError(f"no standard-library sources under {sysconfig.get_paths()['stdlib']} to build the "
                         "embedded corpus from: pass data.path=<your text files>")
    return tuple(out)


def _add_docstrings(rel: str, path: Path, seen: set, out: list) -> None:
    """Append (rel, docstring) for the new docstrings of one file; skip it if it does not parse."""
    try:
        source = path.read_bytes().decode("utf-8", errors="replace")
        with warnings.catch_warnings():  # e.g. SyntaxWarning for "\d" in old docstrings: print nothing
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=rel)
    except (OSError, SyntaxError, ValueError):  # unreadable, or not valid for this Python: skip it
        return
    for node in _definitions(tree):
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        # cleandoc strips the indentation; the utf-8 round trip turns lone surrogates from escapes
        # like "\udc80" in a docstring into "?" so every document is valid UTF-8 for json/arrow.
        text = inspect.cleandoc(doc).encode("utf-8", errors="replace").decode("utf-8")
        if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
            seen.add(text)
            out.append((rel, text))


def _task_records() -> List[Dict[str, str]]:
    """Balanced {"text", "label"} records: every label capped at the rarest label's count."""
    by_label: Dict[str, Dict[str, None]] = {label: {} for label in TASK_LABELS}  # dict: ordered set
    for rel, text in _stdlib_docstrings():
        label = rel.split("/", 1)[0]
        if label in by_label and "/" in rel:  # inside the package folder (not e.g. a module "xml.py")
            by_label[label].setdefault(_truncate(text), None)
    # A truncated text claimed by two labels would be an unlearnable example: drop it from both.
    counts: Dict[str, int] = {}
    for texts in by_label.values():
        for text in texts:
            counts[text] = counts.get(text, 0) + 1
    cap = min(sum(counts[t] == 1 for t in texts) for texts in by_label.values())
    if cap < MIN_TASK_EXAMPLES_PER_LABEL:
        raise UsageError(f"this Python's standard library has too few docstrings in {', '.join(TASK_LABELS)} "
                         "for the embedded task: pass data.path=<your labelled data>")
    records = []
    for label, texts in by_label.items():
        # Take a spread of each package's docstrings (ordered by hash, not the first files' alphabetically).
        chosen = sorted((t for t in texts if counts[t] == 1), key=_stable_hash)[:cap]
        records.extend({"text": t, "label": label} for t in chosen)
    records.sort(key=lambda r: _stable_hash(r["text"]))  # interleave the labels, deterministically
    return records


def _truncate(text: str, limit: int = TASK_TEXT_CHARS) -> str:
    """The first ~`limit` characters, cut at a space when one is near the end."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", limit * 3 // 4, limit)
    return text[: cut if cut > 0 else limit].rstrip()


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_validation(text: str) -> bool:
    return int(_stable_hash(text)[:8], 16) % 100 < VALIDATION_PERCENT


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Write records to `path` atomically: a temporary file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); a cache may be shared by a team
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
