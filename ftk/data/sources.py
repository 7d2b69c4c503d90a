"""Find and load raw records through `datasets`: local files and folders, or hub dataset names.

Every problem a user can fix (a missing path, an unknown format, a malformed row, a missing
column, no text at all) becomes a UsageError naming the file, line or column and the fix.
"""

from __future__ import annotations

import csv
import glob as globbing
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ftk.errors import UsageError, first_line

# file suffix -> (datasets builder, extra builder kwargs)
FORMATS: Dict[str, tuple] = {
    ".txt": ("text", {"sample_by": "document", "encoding_errors": "replace"}),
    ".text": ("text", {"sample_by": "document", "encoding_errors": "replace"}),
    ".md": ("text", {"sample_by": "document", "encoding_errors": "replace"}),  # only when named, not in folders
    ".jsonl": ("json", {"encoding_errors": "replace"}),
    ".json": ("json", {"encoding_errors": "replace"}),
    ".csv": ("csv", {"encoding_errors": "replace"}),
    ".tsv": ("csv", {"sep": "\t", "encoding_errors": "replace"}),
    ".parquet": ("parquet", {}),
}
# compression suffix -> fsspec's name for it: read through as datasets reads them (fsspec infers it from the name)
COMPRESSIONS: Dict[str, str] = {".gz": "gzip", ".zst": "zstd"}
COMPRESSED = tuple(COMPRESSIONS)


def data_suffix(path: Any) -> str:
    """The format suffix of a data file: that of the name under a compression suffix (a.jsonl.gz: .jsonl), since
    `datasets` reads compressed files as they are."""
    p = Path(path)
    if p.suffix.lower() in COMPRESSED:
        p = Path(p.stem)
    return p.suffix.lower()


def is_local(path: str) -> bool:
    """A path that exists, or is written like one, is local; anything else is a hub dataset name."""
    return (Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.endswith("/")
            or data_suffix(path) in FORMATS or is_glob(path))


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def list_files(path: str, exclude: Sequence[Path] = ()) -> List[Path]:
    """The data files at `path`: a file, a folder searched recursively, or a glob (`shards/*.jsonl.gz`,
    `corpus/**/*.txt`), in a stable (sorted) order; compressed files count as their inner format."""
    root = Path(path).expanduser()
    if is_glob(path):
        files = sorted(Path(p) for p in globbing.glob(str(root), recursive=True) if Path(p).is_file())
        if not files:
            raise UsageError(f"no files match data path {path}; check the pattern (quote it in the shell)")
    elif not root.exists():
        raise UsageError(f"data path {path} does not exist; pass data.path=<file, folder, glob or hub dataset name>")
    elif root.is_file():
        files = [root]
    else:
        # A folder's README.md / SOURCE.md describe the data; they are not part of it.
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and data_suffix(p) in FORMATS and data_suffix(p) != ".md"
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    excluded = {p.resolve() for p in exclude}
    files = [f for f in files if f.resolve() not in excluded]
    if not files:
        skipped = " (a folder's .md files describe the data and are skipped: pass a .md file itself)" if (
            root.is_dir() and any(root.rglob("*.md"))) else ""
        raise UsageError(f"no data files in {path}: expected {', '.join(FORMATS)} files, "
                         f"plain or .gz/.zst{skipped}")
    unknown = [f for f in files if data_suffix(f) not in FORMATS]
    if unknown:
        raise UsageError(f"unsupported data file {unknown[0]}: expected one of {', '.join(FORMATS)}, "
                         "plain or .gz/.zst")
    builders = {FORMATS[data_suffix(f)][0] for f in files}
    if len(builders) > 1:
        raise UsageError(f"{path} mixes data formats ({', '.join(sorted(builders))}); put one format per folder")
    return files


def files_fingerprint(files: Sequence[Path]) -> str:
    """Changes whenever a file is added, removed, renamed or modified."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_records(path: str, *, hub_config: Optional[str] = None, split: str = "train",
                 exclude: Sequence[Path] = ()) -> Any:
    """A `datasets.Dataset` of the records at `path` (file, folder or hub name)."""
    import datasets

    datasets.disable_progress_bars()
    if not is_local(path):
        try:
            return datasets.load_dataset(path, hub_config, split=split)
        except Exception as exc:  # offline, unknown name, unknown split: all user-fixable
            first = first_line(exc, 300)
            raise UsageError(f"cannot load hub dataset '{path}' (split {split}): {first}; "
                             "check the name and network, or pass a local file or folder") from None
    files = list_files(path, exclude)
    builder, kwargs = FORMATS[data_suffix(files[0])]
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as exc:
        raise UsageError(locate_bad_row(files, builder) or f"cannot read {path}: {first_line(exc)}") from None


def locate_bad_row(files: Sequence[Path], builder: str) -> Optional[str]:
    """After datasets failed to parse: find the first malformed row to name its file and line."""
    for f in files:
        opener = gzip.open if f.suffix.lower() == ".gz" else open
        with opener(f, "rt", encoding="utf-8", errors="replace", newline="") as handle:
            if builder == "json" and data_suffix(f) == ".jsonl":
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        if not isinstance(json.loads(line), dict):
                            return f"{f}:{number}: a JSON lines row must be an object like {{\"text\": ...}}"
                    except json.JSONDecodeError as exc:
                        return f"{f}:{number}: malformed JSON ({exc.msg}); fix or remove that line"
            elif builder == "csv":
                reader = csv.reader(handle, delimiter="\t" if data_suffix(f) == ".tsv" else ",")
                width = None
                for row in reader:
                    width = len(row) if width is None else width
                    if row and len(row) != width:
                        return (f"{f}:{reader.line_num}: {len(row)} fields where the header has {width}; "
                                "quote fields that contain the delimiter")
    return None


def text_column(ds: Any, column: str, where: str) -> List[str]:
    """The non-empty strings of `column`, or a UsageError naming the columns there are."""
    if column not in ds.column_names:
        raise UsageError(f"{where} has no column '{column}'; its columns are {', '.join(ds.column_names)}: "
                         f"pass data.text_column=<one of them>")
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UsageError(f"{where} holds no text in column '{column}': the dataset is empty")
    return texts
