"""Tokenize and pack a corpus into the token cache, in bounded memory, with several processes, once per cache.

Documents stream from `ftk.data.stream` in batches of at most BATCH_DOCS documents / BATCH_CHARS characters.
Each batch is tokenized (by a pool of `num_proc` worker processes, results taken back in submission order, at most
2 x num_proc batches in flight) into one array of ids with the separator after every document; the main process
cuts the stream into blocks and appends them to `train.npy` / `validation.npy`, whose .npy header is written
last. So memory holds a few batches, whatever the size of the corpus, and the tokens are the same whatever
`num_proc` is: each document's ids do not depend on which process computed them, and the order is kept.

Cache layout, under <cache>/:

    tokens/<key>/train.npy, validation.npy   (n, seq_len) token ids, memory-mapped by every rank (shared pages)
    tokens/<key>/meta.json                   documents, tokens, blocks, bytes, what was skipped
    tokens/<key>.lock                        held (flock) by the one process preparing <key>
    fingerprints/<stat fingerprint>          the content fingerprint of a corpus with these names, sizes, mtimes

<key> hashes the corpus's content fingerprint (every file's bytes, and the split settings), the tokenizer's
fingerprint, seq_len and the block layout. A restart finds its content fingerprint from a stat per file (no text
read); when a file's name, size or mtime changed, the files are hashed again (bytes only, no parsing), so a
touched but unchanged corpus still finds its tokens; changed text or another tokenizer gets another key.
An entry is written under a temporary name and renamed into place complete: a killed or out-of-disk preparation
leaves nothing that a later run could take for a cache.

One preparer per cache location: processes that see the same cache folder take the same lock file (flock), the
first prepares and the others poll until it is done (no collective runs meanwhile, so NCCL's timeout cannot
fire). A node-local cache (FTK_CACHE on local disk) is prepared once per node; a shared one once per job.

At about 450 lines this is over the usual 400: the cache's key, lock, temporary folder and rename are one
protocol, and splitting it would put the rules that make a partial cache unusable in two places. What runs in
the tokenizing processes is apart, in ftk/data/tokenize_worker.py.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np

from ftk.data import stream, tokenize_worker
from ftk.data.lm import Layout, PackedData, _cached_blocks
from ftk.errors import UsageError

CACHE_VERSION = 2
BATCH_DOCS = 1000
BATCH_CHARS = 4_000_000
POLL_S = 2.0
TAIL_FRACTION = 20  # without held-out documents, the last 1/20 of the blocks validate

Say = Callable[[str], None]


@dataclass
class Stats:
    documents: int = 0
    train_documents: int = 0
    validation_documents: int = 0
    tokens: int = 0
    train_blocks: int = 0
    validation_blocks: int = 0
    input_bytes: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0
    num_proc: int = 1
    empty_shards: List[str] = field(default_factory=list)
    validation: str = "held out"   # held out | given | tail of the token stream
    prepared_by: str = ""          # host, pid and rank of the process that prepared it
    main_cpu_s: float = 0.0        # CPU time of the main process (reading, packing, writing) ...
    workers_cpu_s: float = 0.0     # ... and of the tokenizing processes: their ratio bounds the useful num_proc

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Prepared:
    packed: PackedData
    stats: Stats
    folder: Path


def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------- writing blocks


class BlockWriter:
    """Appends (n, seq_len) blocks cut from a token stream to a .npy file; the header is rewritten at the end.

    Cut exactly like `lm.pack`: the stream is cut into `content`-token pieces, wrapped in prefix/suffix when
    the layout has them; the remainder of a batch is carried to the next one; the last partial block dropped."""

    def __init__(self, path: Path, seq_len: int, layout: Layout, dtype: np.dtype):
        self.path, self.seq_len, self.layout, self.dtype = path, seq_len, layout, dtype
        self.content = seq_len - (layout.prefix is not None) - (layout.suffix is not None)
        self.carry = np.zeros(0, dtype=dtype)
        self.rows = 0
        self.handle = open(path, "wb")
        self._header(0)

    def _header(self, rows: int) -> None:
        from numpy.lib import format as npy

        self.handle.seek(0)
        npy.write_array_header_1_0(self.handle, {"descr": npy.dtype_to_descr(self.dtype), "fortran_order": False,
                                                 "shape": (rows, self.seq_len)})
        self.header_bytes = self.handle.tell()

    def add(self, tokens: np.ndarray) -> None:
        stream_ = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        n = len(stream_) // self.content
        if n:
            blocks = stream_[: n * self.content].reshape(n, self.content)
            columns = []
            if self.layout.prefix is not None:
                columns.append(np.full((n, 1), self.layout.prefix, dtype=self.dtype))
            columns.append(blocks)
            if self.layout.suffix is not None:
                columns.append(np.full((n, 1), self.layout.suffix, dtype=self.dtype))
            out = np.concatenate(columns, axis=1) if len(columns) > 1 else blocks
            self.handle.write(np.ascontiguousarray(out, dtype=self.dtype).tobytes())
            self.rows += n
        self.carry = stream_[n * self.content:].copy()

    def move_tail(self, n: int, other: "BlockWriter") -> None:
        """Move the last `n` blocks written here to the end of `other` (copied in bounded chunks)."""
        row_bytes = self.seq_len * self.dtype.itemsize
        self.handle.flush()
        first = self.rows - n
        with open(self.path, "rb") as source:
            for start in range(first, self.rows, 65536):
                count = min(65536, self.rows - start)
                source.seek(self.header_bytes + start * row_bytes)
                other.handle.write(source.read(count * row_bytes))
                other.rows += count
        self.rows = first
        self.handle.seek(self.header_bytes + first * row_bytes)
        self.handle.truncate()

    def close(self) -> None:
        """Write the final header and close."""
        rows = self.rows
        self.handle.flush()
        self.handle.truncate(self.header_bytes + rows * self.seq_len * self.dtype.itemsize)
        before = self.header_bytes
        self._header(rows)
        assert self.header_bytes == before, "npy header changed length"  # numpy pads it for growth
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def _write_rows(path: Path, rows: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(rows))
        handle.flush()
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------- the cache


def cache_key(corpus: stream.Corpus, cache_root: Path, tokenizer_fp: str, seq_len: int, layout: Layout) -> str:
    """The entry of this corpus (by content, looked up by file stats: `Corpus.fingerprint`), tokenizer, seq_len and
    block layout."""
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, "data": corpus.fingerprint(cache_root),
                                      "tokenizer": tokenizer_fp, "seq_len": seq_len, "layout": layout.key()},
                                     sort_keys=True).encode()).hexdigest()[:32]


def _load_entry(folder: Path, seq_len: int, say: Optional[Say], repair: bool) -> Optional[Tuple[PackedData, Stats]]:
    """The finished entry, or None; a damaged one is said and removed when `repair` (only under the lock, so that
    a process never removes the entry another one is writing)."""
    train_file, valid_file, meta = folder / "train.npy", folder / "validation.npy", folder / "meta.json"
    if not (train_file.exists() and valid_file.exists() and meta.exists()):
        return None
    try:
        packed = PackedData(_cached_blocks(train_file, seq_len), _cached_blocks(valid_file, seq_len), True)
        stats = Stats(**json.loads(meta.read_text()))
    except (ValueError, TypeError) as exc:
        if repair:
            if say is not None:
                say(f"token cache: {folder} is damaged ({exc}); rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
        return None
    return packed, stats


@contextmanager
def preparer_lock(lock_path: Path, say: Optional[Say], what: str) -> Iterator[None]:
    """Hold `lock_path` (flock) while preparing; other processes poll it (sleeping, no collective) and go on once
    the holder is done. The kernel drops the lock of a process that dies, so a crash never blocks the others."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        time.sleep(1.0)  # rank 0 takes the lock first when all start together: its progress is the one shown
    handle = open(lock_path, "a+")
    told = False
    try:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and say is not None:
                    say(f"{what}: another process is preparing it ({lock_path}); waiting")
                    told = True
                time.sleep(POLL_S)
        yield
    finally:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            handle.close()


def prepare(corpus: stream.Corpus, tokenizer: Any, tokenizer_fp: str, seq_len: int, objective: str,
            cache_root: Path, num_proc: Optional[int] = None, say: Optional[Say] = None,
            progress: bool = True) -> Prepared:
    """The corpus's blocks from the cache, preparing them first when no process did (see the module docstring)."""
    layout = Layout.for_objective(objective, tokenizer)
    tokens_dir = cache_root / "tokens"
    folder = tokens_dir / cache_key(corpus, cache_root, tokenizer_fp, seq_len, layout)
    hit = _load_entry(folder, seq_len, say, repair=False)  # the restart path: no lock, no text read
    if hit is not None:
        return Prepared(hit[0], hit[1], folder)
    with preparer_lock(tokens_dir / f"{folder.name}.lock", say, f"token cache {folder}"):
        hit = _load_entry(folder, seq_len, say, repair=True)  # another process may have prepared it meanwhile
        if hit is None:
            stats = _prepare_into(folder, corpus, tokenizer, seq_len, layout, num_proc or default_num_proc(),
                                  say, progress)
            hit = _load_entry(folder, seq_len, say, repair=False)
            assert hit is not None, folder
            hit = (PackedData(hit[0].train, hit[0].validation, False), stats)
    return Prepared(hit[0], hit[1], folder)


def _prepare_into(folder: Path, corpus: stream.Corpus, tokenizer: Any, seq_len: int, layout: Layout,
                  num_proc: int, say: Optional[Say], progress: bool) -> Stats:
    for left in folder.parent.glob(f".tmp-{folder.name}-*"):  # a killed preparation's (this one holds the lock)
        shutil.rmtree(left, ignore_errors=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        stats = _pack_stream(tmp, corpus, tokenizer, seq_len, layout, num_proc, say, progress)
        stats.cache_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        meta = tmp / "meta.json"
        meta.write_text(json.dumps(asdict(stats), indent=1))
        os.replace(tmp, folder)
        return stats
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise UsageError(f"ran out of disk space writing the token cache in {folder.parent} ({exc.strerror}); "
                             "the partial cache was removed: free space, or set data.cache_dir (or FTK_CACHE) to "
                             "a larger disk") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def batches(corpus: stream.Corpus) -> Iterator[Tuple[List[str], bool, str]]:
    """(texts, whether to hold documents out by hash, target "train"/"validation") in corpus order."""
    def chunks(docs: Iterator[str]) -> Iterator[List[str]]:
        batch: List[str] = []
        chars = 0
        for text in docs:
            batch.append(text)
            chars += len(text)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    train_docs = corpus.documents(corpus.train, limit=corpus.max_documents)
    if corpus.validation is not None:
        for batch in chunks(train_docs):
            yield batch, False, "train"
        for batch in chunks(corpus.documents(corpus.validation)):
            yield batch, False, "validation"
        return
    # Fewer than MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT documents hold out no document: look that far ahead first.
    head: List[str] = []
    for text in train_docs:
        head.append(text)
        if len(head) >= stream.MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
            break
    split = len(head) >= stream.MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT
    for batch in chunks(_chain(head, train_docs)):
        yield batch, split, "train"


def _chain(head: List[str], rest: Iterator[str]) -> Iterator[str]:
    while head:
        yield head.pop(0)
    yield from rest


def _pack_stream(tmp: Path, corpus: stream.Corpus, tokenizer: Any, seq_len: int, layout: Layout, num_proc: int,
                 say: Optional[Say], progress: bool) -> Stats:
    corpus.counts = stream.Counts()  # this reading's, not an earlier one's (tokenizer training reads it too)
    dtype = np.dtype(np.uint16 if len(tokenizer) < 2**16 else np.int32)
    writers = {"train": BlockWriter(tmp / "train.npy", seq_len, layout, dtype),
               "validation": BlockWriter(tmp / "validation.npy", seq_len, layout, dtype)}
    import socket

    stats = Stats(num_proc=num_proc, input_bytes=corpus.total_bytes(),
                  validation="given" if corpus.validation is not None else "held out",
                  prepared_by=f"{socket.gethostname()} pid {os.getpid()} rank {os.environ.get('RANK', '0')}")
    backend = tokenize_worker.backend_of(tokenizer)
    if backend is None:
        num_proc = stats.num_proc = 1  # a slow (Python) tokenizer is not sent to other processes
    import resource

    started = time.perf_counter()
    cpu_started = time.process_time()
    children_started = resource.getrusage(resource.RUSAGE_CHILDREN)
    bar = Bar(stats.input_bytes, corpus, enabled=progress and say is not None)

    def take(result: Tuple[np.ndarray, int, np.ndarray, int], target: str) -> None:
        train_ids, n_train, valid_ids, n_valid = result
        if target == "validation":
            writers["validation"].add(train_ids)
            stats.validation_documents += n_train
        else:
            writers["train"].add(train_ids)
            writers["validation"].add(valid_ids)
            stats.train_documents += n_train
            stats.validation_documents += n_valid
        stats.tokens += len(train_ids) + len(valid_ids)
        bar.update(stats.tokens, time.perf_counter() - started)

    seed, fraction = corpus.seed, corpus.validation_fraction
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    finished = False
    try:
        if num_proc == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # num_proc=1 means one core
            tokenize_worker.WORKER.update(backend=backend, dtype=dtype, separator=layout.separator, tokenizer=tokenizer)
            for texts, split, target in batches(corpus):
                take(tokenize_worker.encode(texts, split, seed, fraction), target)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent holds torch's threads (and maybe CUDA), which a fork does not survive
            with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=tokenize_worker.init_worker,
                                     initargs=(backend.to_str(), dtype.str, layout.separator)) as pool:
                pending: deque = deque()
                for texts, split, target in batches(corpus):
                    pending.append((pool.submit(tokenize_worker.encode, texts, split, seed, fraction), target))
                    while len(pending) >= 2 * num_proc:
                        future, where = pending.popleft()
                        take(future.result(), where)
                while pending:
                    future, where = pending.popleft()
                    take(future.result(), where)
        finished = True
    finally:
        tokenize_worker.WORKER.clear()
        bar.close(finished)
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    stats.seconds = round(time.perf_counter() - started, 3)
    stats.main_cpu_s = round(time.process_time() - cpu_started, 3)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's workers, joined when the pool closed
    stats.workers_cpu_s = round(children.ru_utime + children.ru_stime - children_started.ru_utime
                                - children_started.ru_stime, 3)
    stats.documents = stats.train_documents + stats.validation_documents
    stats.empty_shards = list(corpus.counts.empty_shards)
    train, validation = writers["train"], writers["validation"]
    if train.rows == 0 and validation.rows > 0 and corpus.validation is None:
        # every document was held out (e.g. a corpus of one text repeated: duplicates share a side): train on
        # them all and validate on the tail, as for a corpus too small to hold documents out
        validation.move_tail(validation.rows, train)
    if validation.rows == 0 and corpus.validation is None:
        # no document held out (a small corpus): validate on the tail of the training stream instead, as before
        n_valid = max(1, train.rows // TAIL_FRACTION) if train.rows >= 2 else 0
        train.move_tail(n_valid, validation)
        stats.validation = "tail of the token stream"
    train.close()
    validation.close()
    stats.train_blocks, stats.validation_blocks = train.rows, validation.rows
    if stats.train_blocks == 0:
        raise UsageError(f"the training data holds fewer than {seq_len} tokens, too few for one block of "
                         f"train.seq_len={seq_len}; add text or lower train.seq_len")
    if stats.validation_blocks == 0:
        raise UsageError(f"the validation data holds fewer than {seq_len} tokens; give a larger "
                         "data.validation_path or lower train.seq_len")
    return stats


class Bar:
    """Progress of a preparation: a rich bar with an ETA on a terminal; a line every LOG_EVERY_S in a batch log.

    Measured in input bytes: files done plus the text read of the current one (for a compressed file, scaled by
    the ratio seen so far, 1/3 until one is done), so the ETA holds for any mix of file sizes."""

    LOG_EVERY_S = 30.0

    def __init__(self, total: int, corpus: stream.Corpus, enabled: bool):
        from rich.console import Console

        self.total, self.corpus, self.enabled = max(1, total), corpus, enabled
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = enabled and self.console.is_terminal
        self.last_log = time.perf_counter()
        self._progress = None
        if self.live:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]prepare"), BarColumn(), DownloadColumn(),
                                      TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                                      refresh_per_second=2)
            self._task = self._progress.add_task("prepare", total=self.total, speed="-")
            self._progress.start()

    def done_bytes(self) -> int:
        return min(self.total, self.corpus.counts.done_bytes())

    def update(self, tokens: int, elapsed: float, final: bool = False) -> None:
        if not self.enabled:
            return
        self.tokens, self.elapsed = tokens, elapsed
        speed = tokens / elapsed if elapsed > 0 else 0.0
        done = self.total if final else self.done_bytes()
        if self._progress is not None:
            self._progress.update(self._task, completed=done, speed=f"{speed:,.0f}")
        elif final or time.perf_counter() - self.last_log >= self.LOG_EVERY_S:
            self.last_log = time.perf_counter()
            eta = elapsed * (self.total - done) / done if done else float("nan")
            self.console.print(f"prepare: {done / self.total:.0%} of {self.total / 1e6:,.1f} MB, {tokens:,} tokens, "
                               f"{speed:,.0f} tokens/s, ETA {eta:,.0f}s")

    def close(self, finished: bool) -> None:
        if finished and self.enabled:
            self.update(getattr(self, "tokens", 0), getattr(self, "elapsed", 0.0), final=True)
        if self._progress is not None:
            self._progress.stop()
