"""Corpus -> token ids, encoded once into a memory-mapped token file; batches.

The inputs (`data_inputs`: files, folders, globs; text, JSONL, Parquet) are streamed through the tokenizer by
worker processes (`data_encode`) straight into a uint16/uint32 file in the cache folder. A cache is named by a key
made without reading the corpus (see `cache_key`), so a cache hit costs a stat per file; it is written to a temporary
name and renamed into place, array first, then its metadata, so an interrupted run never leaves a usable half.

Batches are random contiguous windows drawn from a generator seeded by (seed, step, micro-step), so a
batch depends only on the step: the data cursor of a checkpoint is its step, and a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from aic_core.data import encode as data_encode
from aic_core.data.chat import ChatData, chat_texts
from aic_core.data.encode import (
    EncodeProgress,
    FileRecord,
    Summary,
    encode_into,
    refused_message,
    row_name,
    rows,
    tasks,
)
from aic_core.data.inputs import (
    DataFile,
    ReadOptions,
    available_cpus,
    check_data_file,
    check_data_files,
    expand,
    utf8_error,
    where_not_utf8,
)
from aic_core.errors import DataError
from aic_core.files import file_sha256

if TYPE_CHECKING:  # annotations only: the kinds import the training loop, which reads token data
    from aic_core.plugins.kinds import Tokenizer

__all__ = [
    "ReadOptions",
    "TokenData",
    "check_cache_dir",
    "check_data_files",
    "encode_files",
    "load_splits",
    "token_cache_dir",
    "tokenizer_corpus",
    "utf8_error",
    "where_not_utf8",
]

CACHE_VERSION = 2  # of the cache key and metadata; caches of another version are never read
RACY_NS = 2_000_000_000  # a file modified this close to the start of its encoding is checked by content (see cache_key)


@dataclass
class TokenData:
    ids: np.ndarray  # (N,) uint16 or uint32, usually a read-only memmap
    n_bytes: int  # UTF-8 bytes of the text these tokens encode (for bits per byte)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(
        self, seed: int, stream: int, index: int, batch_size: int, seq_len: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows x (B, T) and the next tokens y (B, T), chosen by a generator seeded with
        (seed, stream, index): stream separates training from evaluation, index is the (step, micro) key."""
        rng = np.random.default_rng([seed, stream, index])
        starts = rng.integers(0, len(self.ids) - seq_len - 1, size=batch_size)
        windows = np.stack([self.ids[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(windows)
        if torch.device(device).type == "cuda":
            w = w.pin_memory().to(device, non_blocking=True)
        return w[:, :-1], w[:, 1:]


def token_cache_dir(configured: str | None) -> Path:
    """Where encoded corpora are cached: data.cache_dir, else $AIC_CACHE_DIR/tokens or ~/.cache/aic/tokens."""
    if configured:
        return Path(configured)
    return Path(os.environ.get("AIC_CACHE_DIR") or Path.home() / ".cache" / "aic") / "tokens"


def cache_key(files: list[DataFile], records: list[FileRecord], read: ReadOptions, tokenizer_hash: str) -> str:
    """The cache's name: a hash of the tokenizer file's hash, what decides the ids (text field, separator, how long
    texts are cut) and, for each input in order, its absolute path, format, size, modification and change times
    (st_mtime_ns, st_ctime_ns). Made from a stat per file, so every rank computes it without reading the corpus.

    Still safe: any write changes the size or the times (and `touch -d` or a restore that sets the modification time
    back still moves the change time, which no program can set). The one gap, a file rewritten with the same size
    within one tick of the filesystem's clock, is closed as git closes it: a file modified less than RACY_NS before
    its encoding began is checked against the content hash taken while it was encoded, each time the cache is opened."""
    key = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_hash,
        "text_field": read.text_field,
        "separator": read.separator,
        "cuts": [data_encode.CHUNK_CHARS, data_encode.TASK_BYTES, data_encode.MAX_CARRY],
        "files": [
            [str(Path(r.path).resolve()), f.format, r.size, r.mtime_ns, r.ctime_ns] for f, r in zip(files, records)
        ],
    }
    if read.chat:  # what decides a conversation's ids and mask (absent for other data: their keys stay as they were)
        key["chat"] = [read.chat_template, read.loss_on, read.messages_field, list(read.role_map)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def encode_files(
    files: list[str],
    field: str,
    tokenizer: Tokenizer,
    tokenizer_hash: str,
    cache_dir: Path,
    read: ReadOptions | None = None,
    echo: Callable[[str], None] | None = None,
    may_encode: bool = True,
) -> TokenData:
    """The tokens of the inputs listed in `field` (documents separated by the end-of-text token), from the cache or
    encoded into it. With `may_encode` False (ranks that wait while another encodes) a missing cache is an error."""
    read = read or ReadOptions()
    inputs = expand(files, field, read)
    for f in inputs:
        check_data_file(f, read)
    records = [FileRecord.of(f.path) for f in inputs]
    digest = cache_key(inputs, records, read, tokenizer_hash)
    bin_path, meta_path = cache_dir / f"{digest}.bin", cache_dir / f"{digest}.json"
    cached = _open_cache(bin_path, meta_path)
    if cached is not None:
        data, meta = cached
        _report_bad_rows(field, inputs, meta, read)
        if echo:
            echo(f"{field}: {len(data):,} tokens from the cache ({bin_path})")
        return data
    if not may_encode:
        raise DataError(
            f"{field}: the token cache {bin_path} is missing, though another process was to write it. "
            "Check that data.cache_dir is one folder all processes of a machine share."
        )
    workers = read.workers or available_cpus()
    started_ns = time.time_ns()
    summary = _write_cache(bin_path, meta_path, inputs, records, tokenizer, read, workers, field, started_ns)
    _report_bad_rows(field, inputs, _meta(summary, tokenizer, records, started_ns, read.chat), read)
    if echo:
        rate = summary.input_bytes / max(summary.seconds, 1e-9)
        echo(
            f"{field}: encoded {len(inputs):,} file{'s' if len(inputs) != 1 else ''} ({summary.input_bytes / 1e6:,.1f} "
            f"MB, {summary.n_docs:,} documents) into {summary.n_tokens:,} tokens in {summary.seconds:.1f}s "
            f"({rate / 1e6:.1f} MB/s, {summary.n_tokens / max(summary.seconds, 1e-9):,.0f} tokens/s, "
            f"{summary.workers} worker{'s' if summary.workers != 1 else ''})"
        )
    dtype = _dtype(tokenizer, read.chat)
    return TokenData(np.memmap(bin_path, dtype=dtype, mode="r", shape=(summary.n_tokens,)), summary.n_bytes)


def _dtype(tokenizer: Tokenizer, chat: bool = False) -> np.dtype:
    """uint16 where the ids fit, else uint32; chat data always uint32 (ids packed with their mask bits)."""
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 and not chat else np.uint32)


def _meta(
    summary: Summary, tokenizer: Tokenizer, records: list[FileRecord], started_ns: int, chat: bool = False
) -> dict:
    return {
        "version": CACHE_VERSION,
        "dtype": _dtype(tokenizer, chat).name,
        "n_tokens": summary.n_tokens,
        "n_bytes": summary.n_bytes,
        "n_docs": summary.n_docs,
        "n_bad": summary.n_bad,
        "bad": summary.bad,
        "started_ns": started_ns,
        "files": [asdict(r) for r in records],
    }


def _report_bad_rows(field: str, inputs: list[DataFile], meta: dict, read: ReadOptions) -> None:
    n_bad = meta.get("n_bad", 0)
    if not n_bad:
        return
    if read.bad_rows == "refuse":  # a cache written under "skip", read under "refuse"
        summary = Summary(n_bad=n_bad, bad=meta["bad"])
        raise DataError(refused_message(field, inputs[0].field, summary, sum(r["size"] for r in meta["files"])))
    warnings.warn(
        f'{field}: left out {n_bad:,} bad row{"s" if n_bad != 1 else ""} (data.bad_rows is "skip"), '
        f"kept {meta['n_docs']:,} documents: "
        f"{'; '.join(meta['bad'])}{' ...' if n_bad > len(meta['bad']) else ''}",
        stacklevel=2,
    )


def _open_cache(bin_path: Path, meta_path: Path) -> tuple[TokenData, dict] | None:
    """The cached tokens and their metadata, or None if there are none. A cache whose metadata does not parse, whose
    array is not exactly n_tokens * itemsize bytes (a crash, a copy cut short), or whose recently modified inputs no
    longer have the content they were encoded from, is reported with a warning, deleted, and None is returned so
    that it is rebuilt."""
    if not (bin_path.is_file() and meta_path.is_file()):
        return None  # never written, or its writer stopped before the metadata (written last)
    problem = None
    try:
        meta = json.loads(meta_path.read_text())
        dtype, n_tokens, n_bytes = np.dtype(meta["dtype"]), meta["n_tokens"], meta["n_bytes"]
        if (
            dtype not in (np.uint16, np.uint32)
            or type(n_tokens) is not int
            or type(n_bytes) is not int
            or n_tokens <= 0
        ):
            raise ValueError(f"unexpected values {meta!r}")
        if meta.get("version") != CACHE_VERSION or not isinstance(meta.get("files"), list):
            raise ValueError(f"not a version {CACHE_VERSION} token cache")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"{meta_path} does not parse ({exc})"
    else:
        size, expected = bin_path.stat().st_size, n_tokens * dtype.itemsize
        if size != expected:
            problem = (
                f"{bin_path} is {size:,} bytes, but {meta_path.name} describes {n_tokens:,} {dtype.name} tokens "
                f"({expected:,} bytes): it is truncated or damaged"
            )
        else:
            problem = _changed_since(meta)
    if problem is None:
        return TokenData(np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)), n_bytes), meta
    warnings.warn(f"token cache: {problem}; deleting it and encoding the corpus again.", stacklevel=2)
    try:
        meta_path.unlink(missing_ok=True)  # the metadata first: a reader never sees it without its array
        bin_path.unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(
            f"data.cache_dir: cannot delete the damaged token cache {bin_path} ({exc.strerror or exc}). "
            "Delete it by hand, or set data.cache_dir to a writable folder."
        ) from None
    return None


def _changed_since(meta: dict) -> str | None:
    """The racy check of `cache_key`: a file modified less than RACY_NS before its encoding began may have been
    rewritten with the same size and times since; its content hash says whether it was."""
    for record in meta["files"]:
        if max(record["mtime_ns"], record["ctime_ns"]) > meta["started_ns"] - RACY_NS:
            try:
                same = file_sha256(Path(record["path"])) == record["sha256"]
            except OSError:
                same = False
            if not same:
                return f"{record['path']} changed just after it was encoded (same size and times, other content)"
    return None


def _write_cache(
    bin_path: Path,
    meta_path: Path,
    inputs: list[DataFile],
    records: list[FileRecord],
    tokenizer: Tokenizer,
    read: ReadOptions,
    workers: int,
    field: str,
    started_ns: int,
) -> Summary:
    """Stream the tokens into a temporary file beside the cache, then rename it into place, then write the metadata
    the same way: a reader sees a complete pair or no metadata at all (and so no cache), never a half-written
    array. Temporary files that a killed run left (same machine, process gone) are deleted first."""
    tag = f"{socket.gethostname()}.{os.getpid()}"
    tmp, tmp_meta = (
        bin_path.with_name(f".{bin_path.name}.{tag}.tmp"),
        meta_path.with_name(f".{meta_path.name}.{tag}.tmp"),
    )
    check_cache_dir(bin_path.parent)
    progress = EncodeProgress(sum(r.size for r in records), field)
    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(bin_path.parent)
        with open(tmp, "wb") as out:
            summary = encode_into(out, inputs, records, tokenizer, read, workers, field, progress)
            out.flush()
            os.fsync(out.fileno())
        if summary.n_tokens == 0:
            skipped = f" ({summary.n_bad:,} bad rows were left out)" if summary.n_bad else ""
            raise DataError(
                f"{field}: no documents to encode{skipped}: every row is empty or bad. "
                "Check data.text_field and the files."
            )
        os.replace(tmp, bin_path)
        with open(tmp_meta, "w") as f:
            f.write(json.dumps(_meta(summary, tokenizer, records, started_ns, read.chat)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_meta, meta_path)
    except OSError as exc:
        raise DataError(
            f"data.cache_dir: cannot write the token cache {bin_path} ({exc.strerror or exc}). "
            "Free some space there, or set data.cache_dir (or $AIC_CACHE_DIR) to a writable folder."
        ) from None
    finally:
        progress.close()
        for path in (tmp, tmp_meta):
            with contextlib.suppress(OSError):  # never in place of the error that brought us here
                path.unlink(missing_ok=True)
    return summary


def check_cache_dir(folder: Path) -> None:
    """The token cache's folder is a folder, or can be made one: no file stands in its place."""
    blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file, not a folder" if blocker == folder else f"cannot be made: {blocker} is a file"
        raise DataError(
            f"data.cache_dir: {folder} {where}. Set data.cache_dir (or $AIC_CACHE_DIR; unset, the cache is "
            "~/.cache/aic/tokens) to a folder, or move the file away."
        )


def _remove_stale(folder: Path) -> None:
    """Delete `.NAME.HOST.PID.tmp` files of this machine whose process is gone (a run killed while it wrote)."""
    host = socket.gethostname()
    for path in folder.glob(".*.tmp"):
        head, _, pid = path.name[: -len(".tmp")].rpartition(".")
        if not pid.isdigit() or not head.endswith(f".{host}"):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


# --- the tokenizer's training text ------------------------------------------------------------------


@contextmanager
def tokenizer_corpus(entries: list[str], read: ReadOptions, folder: Path) -> Iterator[tuple[list[Path], str]]:
    """Plain text files for a tokenizer plugin to train on, and a line saying what they are: text files without a
    separator as they are; the documents of the others (JSONL, Parquet, separated text) streamed into text files in
    a temporary folder under `folder`, one blank line between documents, deleted afterwards. Memory stays bounded;
    the temporary files take about the size of those documents' text."""
    inputs = expand(entries, "data.train", read)
    for f in inputs:
        check_data_file(f, read)
    direct = [f for f in inputs if f.format == "text" and not read.separator and not read.chat]
    size = sum(f.path.stat().st_size for f in inputs)
    described = f"{len(inputs):,} file{'s' if len(inputs) != 1 else ''} of data.train ({size / 1e6:,.1f} MB)"
    if len(direct) == len(inputs):
        yield [f.path for f in inputs], described
        return
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-text-", dir=folder) as tmp:
        paths: list[Path] = []
        summary = Summary()
        for i, f in enumerate(inputs):
            if f in direct:
                paths.append(f.path)
                continue
            paths.append(Path(tmp) / f"{i:05d}.txt")
            with open(paths[-1], "w", encoding="utf-8", newline="") as out:
                for task, _ in tasks([f], [FileRecord.of(f.path)], read):
                    found = chat_texts(task, read) if read.chat else rows(task, read.text_field)
                    for text, _, ends, k, problem in found:
                        if k == -1:
                            raise DataError(
                                f"{f.where} is not UTF-8 text: {where_not_utf8(f.path)}. Convert it to UTF-8 (e.g. "
                                "`iconv -f latin1 -t utf-8`) or remove it from the list."
                            )
                        if problem is not None:
                            summary.n_bad += 1
                            summary.bad += [f"{row_name(f, task[2] + k)}: {problem}"][
                                : data_encode.SHOWN_BAD_ROWS - len(summary.bad)
                            ]
                            if read.bad_rows == "refuse":
                                raise DataError(refused_message("data.train", f.field, summary, f.path.stat().st_size))
                            continue
                        out.write(text)
                        summary.n_docs += ends
                        if ends:
                            out.write("\n\n")  # a paragraph break: no training sentence spans two documents
        if not direct and summary.n_docs == 0:  # said here: the plugin would name a temporary file
            left_out = f"all {summary.n_bad:,} rows were left out as bad" if summary.n_bad else "every row is empty"
            raise DataError(
                f"data.train: no documents to train the tokenizer on: {left_out} (data.bad_rows is "
                f'"{read.bad_rows}"){": " + "; ".join(summary.bad) if summary.bad else ""}'
                f"{' ...' if summary.n_bad > len(summary.bad) else ''}. "
                "Check data.text_field and the files."
            )
        skipped = f", {summary.n_bad:,} bad rows left out" if summary.n_bad else ""
        yield paths, f"{described}, {summary.n_docs:,} documents as text{skipped}"


# --- splits ----------------------------------------------------------------------------------------


def load_splits(
    train_files: list[str],
    val_files: list[str],
    val_fraction: float,
    tokenizer: Tokenizer,
    tokenizer_hash: str,
    cache_dir: Path,
    seq_len: int,
    read: ReadOptions | None = None,
    echo: Callable[[str], None] | None = None,
    may_encode: bool = True,
) -> tuple[TokenData, TokenData]:
    """Training and validation tokens: the val files, or the last `val_fraction` of the training tokens
    (at least `seq_len + 2`, the least a split can be: a window of seq_len + 1 tokens and a start to draw)."""
    read = read or ReadOptions()
    if read.chat:
        return chat_splits(
            train_files, val_files, val_fraction, tokenizer, tokenizer_hash, cache_dir, seq_len, read, echo, may_encode
        )
    need = seq_len + 2
    train = encode_files(train_files, "data.train", tokenizer, tokenizer_hash, cache_dir, read, echo, may_encode)
    if val_files:
        val = encode_files(val_files, "data.val", tokenizer, tokenizer_hash, cache_dir, read, echo, may_encode)
    else:
        if len(train) < 2 * need:
            raise DataError(
                f"data.train: the corpus is too small for a training context of {seq_len} tokens: "
                f"{_names(train_files)} {'holds' if len(train_files) == 1 else 'hold'} {train.n_bytes:,} bytes, "
                f"{len(train):,} tokens. A training or validation window is train.seq_len + 1 = {seq_len + 1} tokens "
                f"and each split needs at least {need}, so {2 * need} in all when the validation split is cut from "
                "data.train. Add more text to data.train, lower train.seq_len (default: model.block_size), "
                "or give a separate validation file in data.val."
            )
        n_val = max(int(len(train) * val_fraction), need)
        if n_val > len(train) * val_fraction:
            warnings.warn(
                f"data.val_fraction: the corpus is only {len(train):,} tokens, so the validation split is {n_val:,} "
                f"tokens, {n_val / len(train):.1%} of it instead of val_fraction {val_fraction:.1%}: "
                f"one window of train.seq_len + 1 = {seq_len + 1} tokens (and one more) is the least a split can be. "
                f"Training keeps {len(train) - n_val:,} tokens. Add more text, "
                "or give a separate validation file in data.val.",
                stacklevel=2,
            )
        cut = len(train) - n_val
        val_ids = train.ids[cut:]
        val_bytes = decoded_bytes(tokenizer, val_ids)  # of the held-out tail's decoded text, so bits per byte is exact
        val = TokenData(val_ids, val_bytes)
        train = TokenData(train.ids[:cut], train.n_bytes - val_bytes)
    for data, field, files in ((train, "data.train", train_files), (val, "data.val", val_files)):
        if len(data) < need:  # only with data.val given: a split cut from data.train was sized above
            raise DataError(
                f"{field}: too little text for a training context of {seq_len} tokens: "
                f"{_names(files)} {'holds' if len(files) == 1 else 'hold'} {data.n_bytes:,} bytes, "
                f"{len(data):,} tokens, but a window is train.seq_len + 1 = {seq_len + 1} tokens and {field} needs at "
                f"least {need}. Add more text to {field}, or lower train.seq_len (default: model.block_size)."
            )
    return train, val


def chat_splits(
    train_files: list[str],
    val_files: list[str],
    val_fraction: float,
    tokenizer: Tokenizer,
    tokenizer_hash: str,
    cache_dir: Path,
    seq_len: int,
    read: ReadOptions,
    echo: Callable[[str], None] | None = None,
    may_encode: bool = True,
) -> tuple[ChatData, ChatData]:
    """Training and validation conversations (chat data): data.val's, or the last val_fraction of data.train's (at
    least one)."""
    args = (tokenizer, tokenizer_hash, cache_dir, read, echo, may_encode)
    train_raw = encode_files(train_files, "data.train", *args)
    train = ChatData(train_raw.ids, tokenizer, seq_len, read.overlong, train_raw.n_bytes, read.pack)
    if val_files:
        val_raw = encode_files(val_files, "data.val", *args)
        val = ChatData(val_raw.ids, tokenizer, seq_len, read.overlong, val_raw.n_bytes, read.pack)
    else:
        n = len(train.starts)
        if n < 2:
            raise DataError(
                f"data.train: {n} conversation{'s' if n != 1 else ''} (after data.overlong), too few to hold out a "
                "validation split: add conversations, or give data.val."
            )
        n_val = max(1, int(n * val_fraction))
        val = train.subset(n - n_val, n, tokenizer, seq_len)
        train = train.subset(0, n - n_val, tokenizer, seq_len)
    for data, field in ((train, "data.train"), (val, "data.val")):
        if not len(data.starts) or not len(data):
            raise DataError(
                f"{field}: no conversation with a token to train on (after data.overlong "
                f"'{read.overlong}' and train.loss_on '{read.loss_on}'). Check the rows and data.overlong."
            )
        if echo:
            over = (
                f"; {data.n_overlong:,} longer than train.seq_len + 1 = {seq_len + 1} tokens "
                f"{'left out' if data.dropped else 'cut there'} (data.overlong)"
                if data.n_overlong
                else ""
            )
            rows = (
                f", packed {data.n_rows:,} row{'s' if data.n_rows != 1 else ''} of up to {seq_len + 1} tokens "
                f"({data.fill:.0%} full)"
                if data.pack
                else ", one a row (data.pack false)"
            )
            echo(
                f"{field}: {len(data.starts):,} conversations{rows}, {len(data):,} of their tokens trained on "
                f"(train.loss_on '{read.loss_on}'){over}"
            )
    return train, val


def decoded_bytes(tokenizer: Tokenizer, ids: np.ndarray, group: int = 1 << 20) -> int:
    """UTF-8 bytes of the text of `ids`: decode(ids) without the end-of-text tokens between documents (they are no
    text, whatever a tokenizer's decode writes for them), a group of about `group` tokens at a time so that memory
    stays bounded. Groups end just after an end-of-text token, where no character's bytes (byte-fallback pieces) are
    split."""
    eos = tokenizer.eos_id

    def text_bytes(part: np.ndarray) -> int:
        return len(tokenizer.decode(part[part != eos].tolist() if eos is not None else part.tolist()).encode("utf-8"))

    if eos is None or len(ids) <= group:
        return text_bytes(np.asarray(ids))
    total, start = 0, 0
    while start < len(ids):
        end = min(start + group, len(ids))
        if end < len(ids):
            ends = np.flatnonzero(ids[start:end] == eos)
            end = start + int(ends[-1]) + 1 if len(ends) else _next_eos(ids, end, eos)
        total += text_bytes(ids[start:end])
        start = end
    return total


def _next_eos(ids: np.ndarray, start: int, eos: int) -> int:
    """Just after the first eos at or after `start`, or the end."""
    step = 1 << 20
    for lo in range(start, len(ids), step):
        found = np.flatnonzero(ids[lo : lo + step] == eos)
        if len(found):
            return lo + int(found[0]) + 1
    return len(ids)


def _names(files: list[str]) -> str:
    return ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
