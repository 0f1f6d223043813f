"""Corpus -> token ids, encoded once into a memory-mapped array cached by content hash; batches.

Batches are random contiguous windows drawn from a generator seeded by (seed, step, micro-step), so a
batch depends only on the step: the data cursor of a checkpoint is its step, and a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aic_core.errors import DataError
from aic_core.kinds import Tokenizer

_CHUNK_CHARS = 1 << 16  # encode in chunks of whole lines: bounded memory and tokenizer work per call
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")  # what a folder given as a data file is searched for


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_cache_dir(configured: str | None) -> Path:
    """Where encoded corpora are cached: data.cache_dir, else $AIC_CACHE_DIR/tokens or ~/.cache/aic/tokens."""
    if configured:
        return Path(configured)
    return Path(os.environ.get("AIC_CACHE_DIR") or Path.home() / ".cache" / "aic") / "tokens"


def check_data_files(data, fields: tuple[str, ...] = ("train", "val")) -> None:  # noqa: ANN001 (a DataSpec)
    """Refuse a data file that is missing, a folder, unreadable or empty, naming its spec field
    (`data.train[0]: ...`). Cheap (a stat and one small read per file), for `aic validate` and the
    start of `aic run`; the text itself (UTF-8, only whitespace) is checked when it is read."""
    for key in fields:
        for i, name in enumerate(getattr(data, key, None) or []):
            check_data_file(name, f"data.{key}[{i}]")


def check_data_file(name: str | os.PathLike, field: str) -> Path:
    """One data file: it exists, is a regular file (not a folder), can be read and is not empty."""
    path = Path(name)
    hint = "Check the path (relative paths are taken from the spec file's folder)."
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{field}: file not found: {path}. {hint}") from None
    except OSError as exc:
        raise DataError(f"{field}: {path} cannot be read ({exc.strerror or exc}). Check the path and the permissions of its folders.") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{field}: {path} is a folder, not a text file. {_folder_hint(path)}")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{field}: {path} is not a regular file (a device, pipe or socket). List UTF-8 text files.")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise DataError(f"{field}: {path} cannot be read ({exc.strerror or exc}). Check its permissions (e.g. `chmod a+r {path}`).") from None
    if not head.strip() and st.st_size <= len(head):
        what = "empty (0 bytes)" if not head else "empty (only whitespace)"
        raise DataError(f"{field}: {path} is {what}. Give it some text or remove it from the list.")
    return path


def _folder_hint(folder: Path) -> str:
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    except OSError as exc:
        return f"List the text files in it one by one (the folder cannot be listed: {exc.strerror or exc})."
    texts = [p for p in entries if p.suffix.lower() in _TEXT_SUFFIXES]
    if not entries:
        return "It holds no files; list UTF-8 text files one by one."
    shown = texts or entries
    names = ", ".join(f'"{p}"' for p in shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
    if texts:
        return f"List the text files in it one by one instead; it holds {len(texts)} text files ({', '.join(_TEXT_SUFFIXES)}): {names}."
    return f"List its text files one by one instead; it holds no {', '.join(_TEXT_SUFFIXES)} files, but {len(entries)} others: {names}."


def utf8_error(path: str | os.PathLike, block_size: int = 1 << 20) -> str | None:
    """Where a file stops being UTF-8, as "invalid start byte 0xe9 at byte 1572870 (line 30012)",
    with the byte offset counted from the start of the FILE; None if the whole file decodes.
    Streams the file in blocks through an incremental decoder, so any file size is fine."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0  # bytes of the file fed to the decoder before this block
    lines = 1  # line number at the start of this block
    with open(path, "rb") as f:
        while True:
            block = f.read(block_size)
            pending = decoder.getstate()[0]  # an incomplete sequence carried over from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:  # exc.start counts from the start of pending + block
                offset = read - len(pending) + exc.start
                line = lines + block.count(b"\n", 0, max(0, exc.start - len(pending)))
                bad = " ".join(f"0x{b:02x}" for b in exc.object[exc.start : exc.end])
                return f"{exc.reason} {bad} at byte {offset} (line {line})"
            if not block:
                return None
            read += len(block)
            lines += block.count(b"\n")


def where_not_utf8(path: str | os.PathLike) -> str:
    """`utf8_error` for a message, after a decode already failed: never raises."""
    try:
        return utf8_error(path) or "it does not decode"
    except OSError as exc:
        return f"it does not decode, and cannot be read again ({exc.strerror or exc})"


def _not_utf8(field: str, path: Path) -> DataError:
    return DataError(f"{field}: {path} is not UTF-8 text: {where_not_utf8(path)}. Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove it from the list.")


def read_corpus(files: list[str], field: str) -> list[tuple[Path, str]]:
    """Read text files, refusing missing, unreadable or empty ones with the spec field named."""
    if not files:
        raise DataError(f"{field}: no files given; list at least one UTF-8 text file.")
    texts = []
    for i, name in enumerate(files):
        path = check_data_file(name, f"{field}[{i}]")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise _not_utf8(f"{field}[{i}]", path) from None
        except OSError as exc:
            raise DataError(f"{field}[{i}]: {path} cannot be read ({exc.strerror or exc}). Check the file and its permissions.") from None
        if not text.strip():
            raise DataError(f"{field}[{i}]: {path} is empty (only whitespace). Give it some text or remove it from the list.")
        texts.append((path, text))
    return texts


def _encode_text(text: str, tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    chunk: list[str] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        if size >= _CHUNK_CHARS:
            ids.extend(tokenizer.encode("".join(chunk)))
            chunk, size = [], 0
    if chunk:
        ids.extend(tokenizer.encode("".join(chunk)))
    return ids


def encode_files(files: list[str], field: str, tokenizer: Tokenizer, tokenizer_hash: str, cache_dir: Path) -> TokenData:
    """Encode the files (documents separated by the end-of-text token) into a cached memmap."""
    texts = read_corpus(files, field)
    key = hashlib.sha256(tokenizer_hash.encode())
    for _, text in texts:
        key.update(hashlib.sha256(text.encode("utf-8")).digest())
    digest = key.hexdigest()[:32]
    bin_path, meta_path = cache_dir / f"{digest}.bin", cache_dir / f"{digest}.json"
    cached = _open_cache(bin_path, meta_path)
    if cached is not None:
        return cached

    all_ids: list[int] = []
    for _, text in texts:
        all_ids.extend(_encode_text(text, tokenizer))
        if tokenizer.eos_id is not None:
            all_ids.append(tokenizer.eos_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    array = np.asarray(all_ids, dtype=dtype)
    n_bytes = sum(len(text.encode("utf-8")) for _, text in texts)
    _write_cache(bin_path, meta_path, array, n_bytes)
    ids = np.memmap(bin_path, dtype=dtype, mode="r", shape=(len(array),))
    return TokenData(ids, n_bytes)


def _open_cache(bin_path: Path, meta_path: Path) -> TokenData | None:
    """The cached tokens, or None if there are none. A cache whose metadata does not parse or whose
    array is not exactly n_tokens * itemsize bytes (a crash, a copy cut short) is reported with a
    warning, deleted, and None is returned so that it is rebuilt."""
    if not (bin_path.is_file() and meta_path.is_file()):
        return None  # never written, or its writer stopped before the metadata (written last)
    problem = None
    try:
        meta = json.loads(meta_path.read_text())
        dtype, n_tokens, n_bytes = np.dtype(meta["dtype"]), meta["n_tokens"], meta["n_bytes"]
        if dtype not in (np.uint16, np.uint32) or type(n_tokens) is not int or type(n_bytes) is not int or n_tokens <= 0:
            raise ValueError(f"unexpected values {meta!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"{meta_path} does not parse ({exc})"
    else:
        size, expected = bin_path.stat().st_size, n_tokens * dtype.itemsize
        if size != expected:
            problem = f"{bin_path} is {size:,} bytes, but {meta_path.name} describes {n_tokens:,} {dtype.name} tokens ({expected:,} bytes): it is truncated or damaged"
    if problem is None:
        return TokenData(np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)), n_bytes)
    warnings.warn(f"token cache: {problem}; deleting it and encoding the corpus again.")
    try:
        meta_path.unlink(missing_ok=True)  # the metadata first: a reader never sees it without its array
        bin_path.unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot delete the damaged token cache {bin_path} ({exc.strerror or exc}). Delete it by hand, or set data.cache_dir to a writable folder.") from None
    return None


def _write_cache(bin_path: Path, meta_path: Path, array: np.ndarray, n_bytes: int) -> None:
    """Array, then metadata, each written to a temporary file and renamed into place: a reader sees
    a complete pair or no metadata at all (and so no cache), never a half-written array."""
    pid = os.getpid()
    tmp, tmp_meta = bin_path.with_name(f".{bin_path.name}.{pid}.tmp"), meta_path.with_name(f".{meta_path.name}.{pid}.tmp")
    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            array.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, bin_path)
        with open(tmp_meta, "w") as f:
            f.write(json.dumps({"dtype": array.dtype.name, "n_tokens": len(array), "n_bytes": n_bytes}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_meta, meta_path)
    except OSError as exc:
        raise DataError(
            f"data.cache_dir: cannot write the token cache {bin_path} ({exc.strerror or exc}). "
            "Free some space there, or set data.cache_dir (or $AIC_CACHE_DIR) to a writable folder."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)


def load_splits(
    train_files: list[str],
    val_files: list[str],
    val_fraction: float,
    tokenizer: Tokenizer,
    tokenizer_hash: str,
    cache_dir: Path,
    seq_len: int,
) -> tuple[TokenData, TokenData]:
    """Training and validation tokens: the val files, or the last `val_fraction` of the training tokens
    (at least `seq_len + 2`, the least a split can be: a window of seq_len + 1 tokens and a start to draw)."""
    need = seq_len + 2
    train = encode_files(train_files, "data.train", tokenizer, tokenizer_hash, cache_dir)
    if val_files:
        val = encode_files(val_files, "data.val", tokenizer, tokenizer_hash, cache_dir)
    else:
        if len(train) < 2 * need:
            raise DataError(
                f"data.train: the corpus is too small for a training context of {seq_len} tokens: {_names(train_files)} "
                f"{'holds' if len(train_files) == 1 else 'hold'} {train.n_bytes:,} bytes, {len(train):,} tokens. A training or validation "
                f"window is train.seq_len + 1 = {seq_len + 1} tokens and each split needs at least {need}, so {2 * need} in all when "
                f"the validation split is cut from data.train. Add more text to data.train, lower train.seq_len "
                f"(default: model.block_size), or give a separate validation file in data.val."
            )
        n_val = max(int(len(train) * val_fraction), need)
        if n_val > len(train) * val_fraction:
            warnings.warn(
                f"data.val_fraction: the corpus is only {len(train):,} tokens, so the validation split is {n_val:,} tokens, "
                f"{n_val / len(train):.1%} of it instead of val_fraction {val_fraction:.1%}: one window of train.seq_len + 1 = "
                f"{seq_len + 1} tokens (and one more) is the least a split can be. Training keeps {len(train) - n_val:,} tokens. "
                "Add more text, or give a separate validation file in data.val."
            )
        cut = len(train) - n_val
        val_ids = train.ids[cut:]
        # Bytes of the held-out tail, measured on its decoded text, so bits per byte is exact.
        val_bytes = len(tokenizer.decode([int(i) for i in val_ids]).encode("utf-8"))
        val = TokenData(val_ids, val_bytes)
        train = TokenData(train.ids[:cut], train.n_bytes - val_bytes)
    for data, field, files in ((train, "data.train", train_files), (val, "data.val", val_files)):
        if len(data) < need:  # only with data.val given: a split cut from data.train was sized above
            raise DataError(
                f"{field}: too little text for a training context of {seq_len} tokens: {_names(files)} "
                f"{'holds' if len(files) == 1 else 'hold'} {data.n_bytes:,} bytes, {len(data):,} tokens, but a window is "
                f"train.seq_len + 1 = {seq_len + 1} tokens and {field} needs at least {need}. Add more text to {field}, "
                f"or lower train.seq_len (default: model.block_size)."
            )
    return train, val


def _names(files: list[str]) -> str:
    return ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
