"""Streaming a corpus through the tokenizer into a token file: bounded memory, N worker processes, document order.

The parent reads each file in blocks of about TASK_BYTES (text: documents, or pieces of one, cut at separators and
safe points; JSONL: whole lines; Parquet: record batches of the text column) and hands each block, as one task, to
a worker process. Results are written in task order (a window of at most WINDOW tasks per worker in flight), so the
parent holds a few blocks at a time, whatever the corpus size, and the token file is the same bytes for any number
of workers. The last document of a file ends there; documents are separated by the end-of-text token.

A document longer than CHUNK_CHARS is encoded in pieces cut just before a space that follows a non-space character
(before a run of spaces): no SentencePiece piece spans such a point (a "▁" only starts a piece, or fills a piece of
spaces), nor does a GPT-2 style pre-token, so the ids are those of the whole document encoded at once, and short
pieces encode faster than one long text. Text with no space for MAX_CARRY bytes (e.g. Chinese) is cut at a line end.

Workers are started with "spawn" (a fresh interpreter: safe beside torch's threads and a process group); each gets
the tokenizer once, pickled (a SentencePiece tokenizer pickles as its model's bytes). A worker imports only this
module, numpy and the tokenizer's plugin (for the built-in SentencePiece plugin: no torch), not the program that
started it: see `_main_hidden`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import sys
import time
import types
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from aic_core.data.inputs import DataFile, ReadOptions, pyarrow_parquet, text_column, where_not_utf8
from aic_core.errors import DataError
from aic_core.files import format_bytes

TASK_BYTES = 1 << 20  # input bytes per task: what the parent holds per task in flight
WINDOW = 4  # tasks in flight per worker: enough to keep every worker busy while the parent writes
CHUNK_CHARS = 1024  # documents are encoded in pieces of about this many characters: SentencePiece is faster on these
MAX_CARRY = 4 << 20  # a text with no safe cut in this many bytes is cut at a line end (or a character boundary)
POOL_MIN_BYTES = 8 << 20  # smaller corpora are encoded in this process: starting workers costs what they would save
SHOWN_BAD_ROWS = 5  # bad rows named in a message

Task = tuple  # ("text" | "jsonl" | "parquet", file index, first line or row, payload)


@dataclass(frozen=True)
class Settings:
    """What a worker needs besides the tokenizer: the same in every worker, so any worker gives the same ids."""

    text_field: str
    dtype: str  # uint16 | uint32
    eos_id: int | None
    chunk_chars: int
    # Chat data: (template source, loss_on, messages_field, role_map pairs); ids are then packed with their loss mask
    # and conversation starts (aic_core.data.chat.pack).
    chat: tuple | None = None


@dataclass
class FileRecord:
    """One input file as it was encoded: the stat the cache key was made from, and its content hash."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    sha256: str = ""

    @classmethod
    def of(cls, path: os.PathLike) -> FileRecord:
        st = os.stat(path)
        return cls(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_stat(self, other: FileRecord) -> bool:
        return (self.size, self.mtime_ns, self.ctime_ns) == (other.size, other.mtime_ns, other.ctime_ns)


@dataclass
class Summary:
    n_tokens: int = 0
    n_bytes: int = 0  # UTF-8 bytes of the documents' text (separators and JSON syntax not counted)
    n_docs: int = 0
    n_bad: int = 0
    bad: list[str] = field(default_factory=list)  # the first SHOWN_BAD_ROWS, as "path:line: reason"
    seconds: float = 0.0
    input_bytes: int = 0
    workers: int = 1


# --- safe cuts ------------------------------------------------------------------------------------


def last_cut(text: str | bytes, lo: int, hi: int) -> int:
    """The last position p in (lo, hi] where a space run starts (text[p] is a space, text[p - 1] is not); -1 if none."""
    space = " " if isinstance(text, str) else b" "
    p = text.rfind(space, lo + 1, hi + 1)
    while p > lo and text[p - 1 : p] == space:
        p -= 1
    return p if p > lo else -1


def next_cut(text: str, lo: int) -> int:
    """The first position p > lo where a space run starts; -1 if none."""
    p = text.find(" ", lo + 1)
    while p > 0 and text[p - 1] == " ":
        p = text.find(" ", p + 1)
    return p


# --- the parent: files -> tasks -------------------------------------------------------------------


class _HashingReader:
    """A binary file read in blocks, hashed as it is read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int) -> bytes:
        block = self.f.read(n)
        self.sha.update(block)
        return block


def tasks(files: list[DataFile], records: list[FileRecord], options: ReadOptions) -> Iterator[tuple[Task, int]]:
    """(task, its input bytes) for every file in order. Each file's content hash is filled into its record once the
    file is read; a file whose stat differs from its record (it changed since the cache key was made) is refused."""
    # Separators are matched in the text as read, with universal newlines: so is a separator itself.
    sep = options.separator.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8") if options.separator else None
    for i, (f, record) in enumerate(zip(files, records)):
        try:
            if f.format == "parquet":
                with open(f.path, "rb") as fh:
                    reader = _HashingReader(fh)
                    while reader.read(1 << 20):
                        pass
                yield from (_parquet_row_tasks(i, f) if options.chat else _parquet_tasks(i, f, options.text_field))
            else:
                with open(f.path, "rb") as fh:
                    reader = _HashingReader(fh)
                    yield from (_text_tasks(i, reader, sep) if f.format == "text" else _jsonl_tasks(i, reader))
            now = FileRecord.of(f.path)
        except OSError as exc:
            raise DataError(
                f"{f.where} cannot be read ({exc.strerror or exc}). Check the file and its permissions."
            ) from None
        if not now.same_stat(record):
            raise DataError(
                f"{f.where} changed while it was being encoded (its size or modification time is not what it was). "
                "Run again once it is complete."
            )
        record.sha256 = reader.sha.hexdigest()


def _text_tasks(index: int, f: _HashingReader, sep: bytes | None) -> Iterator[tuple[Task, int]]:
    """Segments (bytes, ends a document) of about TASK_BYTES per task. Newlines are read universally ("\\r\\n" and
    "\\r" become "\\n", as Python's text mode does), before separators are looked for; empty documents are dropped."""
    segments: list[tuple[bytes, bool]] = []
    size = doc_len = 0
    carry, cr = b"", b""
    while True:
        block = f.read(TASK_BYTES)
        eof = not block
        raw, cr = cr + block, b""
        if not eof and raw.endswith(b"\r"):  # it may be the first half of a "\r\n"
            raw, cr = raw[:-1], b"\r"
        if b"\r" in raw:
            raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = carry + raw
        pieces: list[tuple[bytes, bool]] = []
        pos = 0
        while sep and (found := buf.find(sep, pos)) >= 0:
            pieces.append((buf[pos:found], True))
            pos = found + len(sep)
        rest = buf[pos:]
        if eof:
            pieces.append((rest, True))
            rest = b""
        elif len(rest) > TASK_BYTES:
            limit = len(rest) - (len(sep) - 1 if sep else 0)  # a separator may begin in the last len(sep) - 1 bytes
            cut = last_cut(rest, 0, limit)
            if cut < 0 and len(rest) > MAX_CARRY:
                cut = _hard_cut(rest, limit)
            if cut > 0:
                pieces.append((rest[:cut], False))
                rest = rest[cut:]
        carry = rest
        for seg, ends in pieces:
            if ends and not seg and doc_len == 0:
                continue  # an empty document: two separators in a row, or one at the end
            segments.append((seg, ends))
            size += len(seg)
            doc_len = 0 if ends else doc_len + len(seg)
            if size >= TASK_BYTES:
                yield ("text", index, 0, segments), size
                segments, size = [], 0
        if eof:
            break
    if segments:
        yield ("text", index, 0, segments), size


def _hard_cut(buf: bytes, limit: int) -> int:
    """After the last newline before `limit`, else before the character at `limit`."""
    newline = buf.rfind(b"\n", 0, limit)
    if newline >= 0:
        return newline + 1
    p = max(1, min(limit, len(buf) - 1))
    while p > 0 and buf[p] & 0xC0 == 0x80:  # a UTF-8 continuation byte: not the start of a character
        p -= 1
    return p


def _jsonl_tasks(index: int, f: _HashingReader) -> Iterator[tuple[Task, int]]:
    """Blocks of whole lines, with the number of their first line."""
    parts: list[bytes] = []
    line = 1
    while block := f.read(TASK_BYTES):
        end = block.rfind(b"\n")
        if end < 0:  # a line longer than a block: it is held whole (a JSON object is parsed whole)
            parts.append(block)
            continue
        head = b"".join([*parts, block[: end + 1]])
        yield ("jsonl", index, line, head), len(head)
        line += head.count(b"\n")
        parts = [block[end + 1 :]]
    tail = b"".join(parts)
    if tail:
        yield ("jsonl", index, line, tail), len(tail)


def _parquet_tasks(index: int, f: DataFile, column: str) -> Iterator[tuple[Task, int]]:
    """Record batches of the text column, sized from the file's metadata to about TASK_BYTES each. pyarrow holds
    one row group's column at a time."""
    import pyarrow as pa  # text_column has checked that pyarrow is installed

    pfile = text_column(f, column)
    meta = pfile.metadata
    uncompressed = sum(
        rg.column(c).total_uncompressed_size
        for rg in (meta.row_group(r) for r in range(meta.num_row_groups))
        for c in range(rg.num_columns)
        if rg.column(c).path_in_schema == column
    )
    rows = max(1, min(1 << 16, TASK_BYTES * meta.num_rows // max(1, uncompressed)))
    first = 0
    for batch in pfile.iter_batches(batch_size=rows, columns=[column], use_threads=False):
        values = pa.concat_arrays([batch.column(0)])  # its own buffers: a slice would pickle its whole row group
        yield ("parquet", index, first, values), values.nbytes
        first += len(values)


def _parquet_row_tasks(index: int, f: DataFile) -> Iterator[tuple[Task, int]]:
    """Chat data in Parquet: record batches of whole rows (every column), as lists of dicts."""
    pfile = pyarrow_parquet(f).ParquetFile(f.path)
    meta = pfile.metadata
    rows = max(
        1,
        min(
            1 << 14,
            TASK_BYTES
            * meta.num_rows
            // max(
                1, meta.serialized_size + sum(meta.row_group(r).total_byte_size for r in range(meta.num_row_groups))
            ),
        ),
    )
    first = 0
    for batch in pfile.iter_batches(batch_size=rows, use_threads=False):
        values = batch.to_pylist()
        yield ("parquet-rows", index, first, values), batch.nbytes
        first += len(values)


# --- the workers: task -> ids -----------------------------------------------------------------------


def rows(task: Task, text_field: str) -> Iterator[tuple[str, int, bool, int, str | None]]:
    """A task's documents (or pieces of one) as (text, its UTF-8 bytes, ends a document, line or row within the task,
    None), and its bad rows as ("", 0, False, line or row, what is wrong). Empty documents are left out. A text
    segment that is not UTF-8 gives line -1: the file is refused whole (see encode_into)."""
    kind, _, _, payload = task
    if kind == "text":
        for seg, ends in payload:
            try:
                yield seg.decode("utf-8"), len(seg), ends, 0, None
            except UnicodeDecodeError:
                yield "", 0, False, -1, "not UTF-8"
                return
        return
    found = _jsonl_rows(payload, text_field) if kind == "jsonl" else _parquet_rows(payload, text_field)
    for k, text, problem in found:
        if problem is not None:
            yield "", 0, False, k, problem
            continue
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a lone surrogate, from a "\ud800" escape
            yield (
                "",
                0,
                False,
                k,
                f"'{text_field}' is not UTF-8 text (a lone surrogate {text[exc.start]!r} at character {exc.start})",
            )
            continue
        if size:
            yield text, size, True, k, None


def _jsonl_rows(block: bytes, name: str) -> Iterator[tuple[int, str | None, str | None]]:
    for k, raw in enumerate(block.split(b"\n")):
        if not raw.strip():
            continue  # blank lines (and the end of the last line) hold no row
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield k, None, f"not UTF-8 ({exc.reason} 0x{raw[exc.start]:02x} at byte {exc.start} of the line)"
            continue
        except ValueError as exc:
            yield k, None, f"not JSON ({getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')})"
            continue
        if not isinstance(row, dict):
            yield k, None, f"a JSON {_json_type(row)}, not an object with a '{name}' field"
        elif name not in row:
            keys = ", ".join(f"'{key}'" for key in list(row)[:6]) or "none"
            yield k, None, f"no field '{name}' (its fields: {keys})"
        elif not isinstance(row[name], str):
            yield k, None, f"'{name}' is {_json_type(row[name])} {_short(row[name])}, not a string"
        else:
            yield k, row[name], None


def _parquet_rows(values: Any, name: str) -> Iterator[tuple[int, str | None, str | None]]:
    for k, value in enumerate(values.to_pylist()):
        if value is None:
            yield k, None, f"'{name}' is null"
        elif isinstance(value, bytes):
            try:
                yield k, value.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield k, None, f"'{name}' is not UTF-8 ({exc.reason} 0x{value[exc.start]:02x} at byte {exc.start})"
        else:
            yield k, value, None


class Encoder:
    """Turns a task into (token bytes, documents, text bytes, bad rows, bad count); a bad row is (file index, line or
    row, reason)."""

    def __init__(self, tokenizer: Any, settings: Settings) -> None:
        self.tokenizer, self.settings = tokenizer, settings
        self.eos = [settings.eos_id] if settings.eos_id is not None else []

    def run(self, task: Task) -> tuple[bytes, int, int, list[tuple[int, int, str]], int]:
        if self.settings.chat is not None:
            from aic_core.data.chat import encode_chat_task

            return encode_chat_task(self, task)
        _, index, first, _ = task
        ids: list[int] = []
        n_docs = n_bytes = n_bad = 0
        bad: list[tuple[int, int, str]] = []
        for text, size, ends, k, problem in rows(task, self.settings.text_field):
            if problem is not None:
                if k == -1:
                    return b"", 0, 0, [(index, -1, problem)], 1
                n_bad += 1
                if len(bad) < SHOWN_BAD_ROWS:
                    bad.append((index, first + k, problem))
                continue
            self._encode(text, ids)
            n_bytes += size
            if ends:
                ids += self.eos
                n_docs += 1
        return np.array(ids, dtype=self.settings.dtype).tobytes(), n_docs, n_bytes, bad, n_bad

    def _encode(self, text: str, ids: list[int]) -> None:
        chunk, start, end = self.settings.chunk_chars, 0, len(text)
        while end - start > chunk:
            cut = last_cut(text, start, start + chunk)
            if cut < 0:
                cut = next_cut(text, start + chunk)
                if cut < 0:
                    break
            ids += self.tokenizer.encode(text[start:cut])
            start = cut
        if start < end:
            ids += self.tokenizer.encode(text[start:])


def _json_type(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }[type(value)]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


_worker: Encoder | None = None


def _start_worker(tokenizer: Any, settings: Settings) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    _worker = Encoder(tokenizer, settings)


def _run_task(task: Task) -> tuple[bytes, int, int, list[tuple[int, int, str]], int]:
    return _worker.run(task)


# --- the parent: tasks -> token file ----------------------------------------------------------------


def encode_into(
    out: BinaryIO,
    files: list[DataFile],
    records: list[FileRecord],
    tokenizer: Any,
    options: ReadOptions,
    workers: int,
    label: str,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Encode the files into `out` (ids as raw uint16/uint32, documents ended by eos) and say what was done. Bad rows
    are refused at the first one (data.bad_rows "refuse") or left out and counted ("skip")."""
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 and not options.chat else "uint32"
    chat = (options.chat_template, options.loss_on, options.messages_field, options.role_map) if options.chat else None
    settings = Settings(options.text_field, dtype, tokenizer.eos_id, CHUNK_CHARS, chat)
    stream = tasks(files, records, options)
    pooled = workers > 1 and sum(r.size for r in records) > max(POOL_MIN_BYTES, TASK_BYTES)
    if pooled and not _picklable(tokenizer):
        warnings.warn(
            f"{label}: the tokenizer ({type(tokenizer).__name__}) cannot be sent to worker processes "
            "(it does not pickle); encoding in this process.",
            stacklevel=2,
        )
        pooled = False
    pool = _start_pool(tokenizer, settings, workers, label) if pooled else None
    if pool is not None:
        results = _in_workers(pool, stream, workers)
    else:
        workers, encoder = 1, Encoder(tokenizer, settings)
        results = ((encoder.run(task), size) for task, size in stream)
    summary = Summary(workers=workers)
    t0 = time.perf_counter()
    try:
        for (ids, n_docs, n_bytes, bad, n_bad), size in results:
            if bad and bad[0][1] == -1:
                f = files[bad[0][0]]
                raise DataError(
                    f"{f.where} is not UTF-8 text: {where_not_utf8(f.path)}. Convert it to UTF-8 (e.g. "
                    "`iconv -f latin1 -t utf-8`) or remove it from the list."
                )
            summary.n_bad += n_bad
            summary.bad += [f"{row_name(files[i], n)}: {reason}" for i, n, reason in bad][
                : SHOWN_BAD_ROWS - len(summary.bad)
            ]
            if n_bad and options.bad_rows == "refuse":
                raise DataError(refused_message(label, files[bad[0][0]].field, summary, summary.input_bytes + size))
            out.write(ids)
            summary.n_tokens += len(ids) // np.dtype(dtype).itemsize
            summary.n_bytes += n_bytes
            summary.n_docs += n_docs
            summary.input_bytes += size
            if progress is not None:
                progress(size, len(ids) // np.dtype(dtype).itemsize)
    finally:
        results.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def row_name(f: DataFile, n: int) -> str:
    """`a.jsonl:12` (line 12) or `b.parquet row 7` (counted from 0, as pyarrow and pandas do)."""
    return f"{f.path}:{n}" if f.format == "jsonl" else f"{f.path} row {n}"


def refused_message(label: str, field: str, summary: Summary, read: int) -> str:
    where = "; ".join(summary.bad) + (" ..." if summary.n_bad > len(summary.bad) else "")
    return (
        f'{field}: bad rows, so {label} was not encoded (data.bad_rows is "refuse"): {summary.n_bad:,} in the first '
        f"{format_bytes(read)} read, where it stopped: {where}. Fix or remove these rows, "
        'or set data.bad_rows to "skip" to leave '
        "such rows out (they are then counted and reported)."
    )


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - whatever pickling raises, the answer is no
        return False
    return True


@contextmanager
def _main_hidden() -> Iterator[None]:
    """While worker processes are spawned, `__main__` is a bare module, so the workers do not run the parent's main
    script again. multiprocessing re-runs it in every spawned child (as `__mp_main__`) in case a function the child
    needs is defined there; aic's are not (the workers run this module's functions and unpickle the tokenizer from
    its plugin module), and `aic`'s console script imports the whole CLI and torch: memory and start-up time in every
    worker for nothing. Not used when the tokenizer's class is defined in `__main__` (a script that defines its own)."""
    main = sys.modules["__main__"]
    bare = types.ModuleType("__main__")  # no __file__, no __spec__: multiprocessing leaves the child's main alone
    sys.modules["__main__"] = bare
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _start_pool(tokenizer: Any, settings: Settings, workers: int, label: str) -> ProcessPoolExecutor | None:
    """Spawned workers, each holding the tokenizer; None (and a warning) if they cannot start, e.g. when Python
    cannot spawn a copy of this program (a script read from stdin)."""
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(tokenizer, settings),
    )
    try:
        # The pool starts its processes as tasks arrive: one task a worker starts them all, here.
        with _main_hidden() if type(tokenizer).__module__ != "__main__" else nullcontext():
            started = [pool.submit(os.getpid) for _ in range(workers)]
        for ready in started:
            ready.result()
    except (BrokenProcessPool, OSError) as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        warnings.warn(f"{label}: worker processes could not start ({exc}); encoding in this process.", stacklevel=2)
        return None
    return pool


def _in_workers(
    pool: ProcessPoolExecutor, stream: Iterator[tuple[Task, int]], workers: int
) -> Iterator[tuple[tuple, int]]:
    """Results in task order from the pool, at most WINDOW tasks per worker in flight."""
    pending: deque = deque()
    done = False
    try:
        for task, size in stream:
            pending.append((pool.submit(_run_task, task), size))
            if len(pending) >= WINDOW * workers:
                future, n = pending.popleft()
                yield future.result(), n
        while pending:
            future, n = pending.popleft()
            yield future.result(), n
        done = True
    except BrokenProcessPool:
        raise DataError(
            "data: an encoding worker process died (killed, or out of memory?). Run again; if it happens again, "
            "lower data.workers (each worker holds the tokenizer and a few MB of text)."
        ) from None
    finally:
        pool.shutdown(wait=done, cancel_futures=True)  # stopped early (an error, Ctrl-C): do not wait for the workers


class EncodeProgress:
    """The encoding's bar: tqdm in MB/s and tokens/s on a terminal; nothing elsewhere (the run log gets one line at
    the end). Not the training bar (aic_core.train.common.Progress, in steps)."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = None
        if getattr(sys.stderr, "isatty", lambda: False)() and total > 8 * TASK_BYTES:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=f"encode {label}",
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        self.tokens, self.t0 = 0, time.perf_counter()

    def __call__(self, n_bytes: int, n_tokens: int) -> None:
        if self.bar is not None:
            self.tokens += n_tokens
            self.bar.update(n_bytes)
            self.bar.set_postfix_str(
                f"{self.tokens / max(1e-9, time.perf_counter() - self.t0) / 1e3:,.0f}k tok/s", refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
