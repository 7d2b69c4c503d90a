"""A pretraining corpus read as a stream of documents, never held in memory.

`resolve(data)` turns the data settings into a `Corpus`: the files (a file, a folder of shards, a glob; plain,
.gz or .zst) or the hub dataset, and how validation is chosen. `Corpus.documents(part)` yields the text of each
document in a fixed order, one file at a time: local JSON/CSV/Parquet shards are read by `datasets` in streaming
mode (no Arrow copy of the corpus), plain-text files (one document per file) are decompressed by fsspec, as
`datasets` itself reads them.

Validation documents, unless a validation file or split is given, are chosen by a keyed hash of their text
(`held_out`): a document is held out when hash(seed, text) < validation_fraction. The choice needs no count and
no pass over the corpus, does not change when other documents are added or removed, and puts exact duplicates
on the same side (no duplicate of a training document is ever scored as validation). A corpus of fewer than
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT documents (or one where no document happens to be held out) holds out the
tail of its token stream instead, as before.

`Corpus.stat_fingerprint` (names, sizes, modification times) is the cheap key a restart looks the cache up by;
`Corpus.content_fingerprint` (the bytes of every file) is computed only when that key is unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ftk.data import sources
from ftk.errors import UsageError, first_line

MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 20
READ_BATCH = 1000  # rows per batch read from a JSON/CSV/Parquet shard
data_suffix = sources.data_suffix  # docs.jsonl.zst -> .jsonl


def compression(path: Path) -> Optional[str]:
    return sources.COMPRESSIONS.get(path.suffix.lower())


list_files = sources.list_files  # a file, a folder of shards or a glob; plain or compressed


def held_out(text: str, seed: int, fraction: float) -> bool:
    """Whether a document is a validation document: a keyed hash of its text, read as a number in [0, 1)."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass
class Part:
    """One stream of documents: local files, or a hub dataset split."""

    files: List[Path] = field(default_factory=list)
    hub: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "train"
    streaming: bool = False

    def describe(self) -> str:
        if self.hub:
            return f"{self.hub}" + (f" ({self.hub_config})" if self.hub_config else "") + f" split {self.split}"
        return str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files under {_common(self.files)}"


def _common(files: Sequence[Path]) -> str:
    try:
        return os.path.commonpath([str(f) for f in files])
    except ValueError:
        return str(files[0].parent)


@dataclass
class Counts:
    """What reading found: documents read and shards skipped for holding no text."""

    documents: int = 0
    text_bytes: int = 0
    empty_shards: List[str] = field(default_factory=list)
    finished_bytes: int = 0        # sizes of the files read to their end
    current_size: int = 0          # size of the file being read ...
    current_chars: int = 0         # ... and the characters of text read from it so far
    current_ratio: float = 1.0     # file bytes per character of text: 1 for plain files, measured for compressed
    compressed_ratio: float = 1 / 3

    def done_bytes(self) -> int:
        """An estimate of the input bytes read so far (for the progress bar)."""
        return self.finished_bytes + min(self.current_size, int(self.current_chars * self.current_ratio))

    def start_file(self, f: Path) -> None:
        self.current_size, self.current_chars = f.stat().st_size, 0
        self.current_ratio = self.compressed_ratio if compression(f) else 1.0

    def end_file(self, f: Path) -> None:
        if compression(f) and self.current_chars:
            self.compressed_ratio = self.current_size / self.current_chars
        self.finished_bytes += self.current_size
        self.current_size = self.current_chars = 0


@dataclass
class Corpus:
    train: Part
    validation: Optional[Part]  # a given validation file/split; None: held out by `held_out`
    text_column: str
    seed: int
    validation_fraction: float
    max_documents: Optional[int]
    description: str
    counts: Counts = field(default_factory=Counts)
    _fingerprint: Optional[str] = None

    @property
    def parts(self) -> List[Part]:
        return [self.train] + ([self.validation] if self.validation else [])

    def settings(self) -> Dict[str, Any]:
        """What, besides the text, decides which documents go where."""
        return {"text_column": self.text_column, "seed": self.seed, "fraction": self.validation_fraction,
                "max_documents": self.max_documents, "given_validation": self.validation is not None,
                "min_docs": MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT}

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for p in self.parts for f in p.files if f.exists())

    def stat_fingerprint(self) -> str:
        """Cheap: file names, sizes and modification times (a stat per file; no byte of text is read)."""
        h = hashlib.sha256(repr(self.settings()).encode())
        for part in self.parts:
            h.update(f"part|{part.hub}|{part.hub_config}|{part.split}|{part.streaming}\n".encode())
            for f in part.files:
                try:
                    st = f.stat()
                except FileNotFoundError:
                    raise UsageError(f"data file {f} disappeared while reading the corpus; pass the data "
                                     "that is there") from None
                h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def content_fingerprint(self) -> str:
        """The bytes of every file (as stored, compressed or not), and the hub dataset's own fingerprint."""
        h = hashlib.sha256(repr(self.settings()).encode())
        for part in self.parts:
            h.update(f"part|{part.hub}|{part.hub_config}|{part.split}|{part.streaming}\n".encode())
            if part.hub:
                h.update(_hub_fingerprint(part).encode())
            for f in part.files:
                try:
                    with open(f, "rb") as handle:
                        digest = hashlib.file_digest(handle, "sha256").hexdigest()
                except FileNotFoundError:
                    raise UsageError(f"data file {f} disappeared while reading the corpus; pass the data "
                                     "that is there") from None
                h.update(f"{f.name}|{digest}\n".encode())  # names, not folders: a moved corpus is the same text
        return h.hexdigest()

    def fingerprint(self, cache_root: Path) -> str:
        """The content fingerprint, looked up by the stat fingerprint in <cache>/fingerprints/ when this corpus was
        seen before (a restart reads no text), computed (and recorded) when a name, size or mtime changed."""
        if self._fingerprint is None and any(part.hub for part in self.parts):
            # no file stats stand for a hub dataset's content: ask datasets each time (its own cached fingerprint)
            self._fingerprint = self.content_fingerprint()
        if self._fingerprint is None:
            index = Path(cache_root) / "fingerprints" / self.stat_fingerprint()
            try:
                self._fingerprint = index.read_text().strip() or None
            except OSError:
                pass
            if self._fingerprint is None:
                self._fingerprint = self.content_fingerprint()
                index.parent.mkdir(parents=True, exist_ok=True)
                tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
                try:
                    tmp.write_text(self._fingerprint + "\n")
                    os.replace(tmp, index)
                except OSError:  # the index only saves hashing the files next time: never worth failing for
                    tmp.unlink(missing_ok=True)
        return self._fingerprint

    def documents(self, part: Part, limit: Optional[int] = None) -> Iterator[str]:
        """The non-empty texts of one part, in order; shards without any are counted in `counts.empty_shards`."""
        n = 0
        if part.hub:
            for text in _hub_documents(part, self.text_column):
                if limit is not None and n >= limit:
                    return
                n += 1
                yield text
            return
        for f in part.files:
            found = False
            if f.exists():
                self.counts.start_file(f)
            for text in _file_documents(f, self.text_column):
                if limit is not None and n >= limit:
                    return
                found = True
                n += 1
                self.counts.documents += 1
                self.counts.text_bytes += len(text)
                self.counts.current_chars += len(text)
                yield text
            self.counts.end_file(f)
            if not found:
                self.counts.empty_shards.append(str(f))
        if n == 0:
            where = part.describe()
            raise UsageError(f"{where} holds no text in column '{self.text_column}': the dataset is empty")


def resolve(data: Any, seed: int) -> Corpus:
    """The corpus a data config points at (no document is read here)."""
    from ftk.data.corpus import embedded_corpus_path
    from ftk.paths import cache_root

    path = data.path
    description = path
    if path is None:
        path = str(embedded_corpus_path(cache_root(data.cache_dir)))
        description = "embedded corpus (Python standard-library docstrings)"
    streaming = bool(data.get("streaming", False)) if hasattr(data, "get") else bool(getattr(data, "streaming", False))
    validation: Optional[Part] = None
    if sources.is_local(path):
        excluded = list_files(data.validation_path) if data.validation_path and (
            sources.is_local(data.validation_path)) else []
        train = Part(files=list_files(path, excluded))
    else:
        train = Part(hub=path, hub_config=data.hub_config, split=data.split, streaming=streaming)
    if data.validation_path:
        if sources.is_local(data.validation_path):
            validation = Part(files=list_files(data.validation_path))
        else:
            validation = Part(hub=data.validation_path, hub_config=data.hub_config,
                              split=data.validation_split or data.split, streaming=streaming)
    elif data.validation_split and train.hub:
        validation = Part(hub=path, hub_config=data.hub_config, split=data.validation_split, streaming=streaming)
    return Corpus(train, validation, data.text_column, seed, data.validation_fraction, data.max_documents,
                  description)


def _file_documents(f: Path, column: str) -> Iterator[str]:
    """The texts in one file, read as `datasets` reads it; a file that is gone or not what its name says is a
    UsageError naming it."""
    if not f.exists():
        raise UsageError(f"data file {f} disappeared while reading the corpus; restore it, or pass the data "
                         "that is there")
    if f.stat().st_size == 0:
        return
    suffix = data_suffix(f)
    builder, kwargs = sources.FORMATS[suffix]
    try:
        if builder == "text":  # one document per file; universal newlines, like datasets' text builder
            import fsspec

            with fsspec.open(str(f), "rt", compression=compression(f), encoding="utf-8", errors="replace") as h:
                text = h.read()
            if text.strip():
                yield text
            return
        if suffix == ".jsonl":
            yield from _jsonl_documents(f, column)
            return
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=True, **kwargs)
        yield from _column_texts(ds, column, str(f))
    except UsageError:
        raise
    except StopIteration:  # datasets finds no row to infer the columns from: a compressed empty shard
        return
    except Exception as exc:
        raise UsageError(_read_error(f, builder, exc)) from None


def _jsonl_documents(f: Path, column: str) -> Iterator[str]:
    """JSON lines read with json.loads, one line at a time. Not through datasets: its streaming JSON reader turns
    rows into Python at ~9 MB/s here, 20x slower than json.loads, and the main process must keep num_proc
    tokenizing processes busy. Decompressed by fsspec as datasets does; a bad row is named by file and line."""
    import fsspec

    first = True
    with fsspec.open(str(f), "rt", compression=compression(f), encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{f}:{number}: malformed JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise UsageError(f"{f}:{number}: a JSON lines row must be an object like {{\"text\": ...}}")
            if first and column not in row:
                raise UsageError(f"{f} has no column '{column}'; its columns are {', '.join(row)}: "
                                 f"pass data.text_column=<one of them>")
            first = False
            text = row.get(column)
            if isinstance(text, str) and text.strip():
                yield text


def _read_error(f: Path, builder: str, exc: BaseException) -> str:
    kind = compression(f)
    text = f"{type(exc).__name__}: {exc}"
    if kind and any(word in text.lower() for word in ("gzip", "not a gzipped", "zstd", "frame", "magic",
                                                        "compressed", "decompress")):
        return (f"{f} is not {kind} data (its {f.suffix} name says it is): compress it with {kind}, or drop the "
                f"{f.suffix} suffix")
    if isinstance(exc, FileNotFoundError):
        return f"data file {f} disappeared while reading the corpus; restore it, or pass the data that is there"
    if kind is None:
        located = sources.locate_bad_row([f], builder)
        if located:
            return located
    return f"cannot read {f}: {first_line(exc)}"


def _hub_dataset(part: Part) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(part.hub, part.hub_config, split=part.split, streaming=part.streaming)
    except Exception as exc:  # offline, unknown name, unknown split: all user-fixable
        raise UsageError(f"cannot load hub dataset '{part.hub}' (split {part.split}): {first_line(exc, 300)}; "
                         "check the name and network, or pass a local file or folder") from None


def _hub_fingerprint(part: Part) -> str:
    ds = _hub_dataset(part)
    fingerprint = getattr(ds, "_fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    # a streamed dataset has no fingerprint of its content: its name, config, split and revision stand for it
    info = getattr(ds, "info", None)
    return f"{part.hub}|{part.hub_config}|{part.split}|{getattr(info, 'dataset_name', '')}|" \
           f"{getattr(info, 'version', '')}|{getattr(info, 'download_checksums', '')}"


def _hub_documents(part: Part, column: str) -> Iterator[str]:
    yield from _column_texts(_hub_dataset(part), column, part.hub)


def _column_texts(ds: Any, column: str, name: str) -> Iterator[str]:
    """The non-blank texts of one column of a (streamed) dataset, read in batches; a missing column is named."""
    for batch in ds.iter(batch_size=READ_BATCH):
        if column not in batch:
            raise UsageError(f"{name} has no column '{column}'; its columns are {', '.join(batch)}: "
                             f"pass data.text_column=<one of them>")
        for text in batch[column]:
            if isinstance(text, str) and text.strip():
                yield text


def validation_documents(corpus: Corpus) -> List[str]:
    """The validation documents of a corpus (given, or held out by `held_out`); empty when the corpus is too small
    to hold documents out (its validation is then the tail of the token stream)."""
    if corpus.validation is not None:
        return list(corpus.documents(corpus.validation))
    out: List[str] = []
    n = 0
    for text in corpus.documents(corpus.train, limit=corpus.max_documents):
        n += 1
        if held_out(text, corpus.seed, corpus.validation_fraction):
            out.append(text)
    return out if n >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT else []
