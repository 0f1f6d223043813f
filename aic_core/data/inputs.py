"""What `data.train` and `data.val` name, as a list of files to read: files, folders and glob patterns, each file
read as UTF-8 text, JSONL or Parquet; and the cheap checks (a stat, a small read, a Parquet footer) that refuse a
missing, unreadable or empty input before any work starts, naming its spec field (`data.train[2]`)."""

from __future__ import annotations

import codecs
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aic_core.errors import DataError, did_you_mean

FORMATS = ("text", "jsonl", "parquet")
SUFFIXES = {"text": (".txt", ".text", ".md", ".rst"), "jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet", ".pq")}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".7z")
PARQUET_EXTRA = 'pip install "aic[parquet]"'
_TEXT_TYPES = ("string", "large_string", "string_view")
_BINARY_TYPES = ("binary", "large_binary", "binary_view")


@dataclass(frozen=True)
class ReadOptions:
    """How inputs are read (the `data` section's fields besides the file lists). `of` takes them from a DataSpec;
    the defaults read plain text files, each one document."""

    format: str = "auto"  # auto | text | jsonl | parquet
    text_field: str = "text"  # the JSONL field / Parquet column holding a document
    separator: str | None = None  # between documents in a text file; None: a text file is one document
    bad_rows: str = "refuse"  # refuse | skip
    workers: int | None = None  # encoding processes; None: the CPUs this process may use
    # Chat data (format "chat"): the turns' field and role map, and, set by the run from the tokenizer and train
    # sections, the chat template's source and what the loss covers.
    messages_field: str | None = None
    role_map: tuple[tuple[str, str], ...] = ()
    chat_template: str | None = None
    loss_on: str = "assistant"
    overlong: str = "truncate"  # truncate | drop: a conversation longer than the context (applied when loaded)
    pack: bool = True  # several conversations a row, with a block-diagonal mask (applied when loaded)

    @classmethod
    def of(cls, data: Any) -> ReadOptions:
        values = {name: getattr(data, name) for name in cls.__dataclass_fields__ if hasattr(data, name)}
        if isinstance(values.get("role_map"), dict):
            values["role_map"] = tuple(sorted(values["role_map"].items()))
        return cls(**values)

    @property
    def chat(self) -> bool:
        return self.format == "chat"


@dataclass(frozen=True)
class DataFile:
    path: Path
    format: str  # text | jsonl | parquet
    field: str  # the spec entry it came from: "data.train[2]"
    origin: str = ""  # " (in the folder 'x')" or " (from the pattern 'x')" when the entry was not the file itself

    @property
    def where(self) -> str:
        """The start of a message about this file, e.g.
        `data.train[2]: shards/a.jsonl (from the pattern 'shards/*.jsonl')`."""
        return f"{self.field}: {self.path}{self.origin}"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def expand(entries: list[str], field: str, options: ReadOptions = ReadOptions()) -> list[DataFile]:
    """The files the entries of `field` name, in order: a file as it is, a folder's data files (by suffix,
    recursively, hidden ones left out) and a glob pattern's matches (`**` for any depth), each sorted by path.
    Refuses an entry that names nothing, naming it as `field[i]`."""
    if not entries:
        raise DataError(f"{field}: no files given; list at least one file, folder or glob pattern.")
    files: list[DataFile] = []
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        path = Path(entry).expanduser()
        if _exists(path, where):
            if path.is_dir():
                found = _folder_files(path, options.format)
                if not found:
                    raise DataError(
                        f"{where}: the folder {path} holds no data files. {_folder_hint(path, options.format)}"
                    )
                files += [DataFile(p, _format_of(p, options.format), where, f" (in the folder {path})") for p in found]
            else:
                files.append(DataFile(path, _format_of(path, options.format), where))
        elif glob.has_magic(entry):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(
                    f"{where}: the pattern '{entry}' matches no file. Check the pattern (relative patterns are taken "
                    "from the spec file's folder; `*` stays within a folder, `**` matches any depth, "
                    "hidden files only with a leading `.`)."
                )
            files += [
                DataFile(p, _format_of(p, options.format), where, f" (from the pattern '{entry}')") for p in matches
            ]
        else:
            raise DataError(
                f"{where}: file not found: {path}. Check the path (relative paths are taken from the "
                "spec file's folder)."
            )
    return files


def _exists(path: Path, where: str) -> bool:
    try:
        path.stat()
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise DataError(
            f"{where}: {path} cannot be read ({exc.strerror or exc}). "
            "Check the path and the permissions of its folders."
        ) from None


def _format_of(path: Path, configured: str) -> str:
    if configured == "chat":  # conversations: Parquet by suffix, else JSONL
        return "parquet" if path.suffix.lower() in SUFFIXES["parquet"] else "jsonl"
    if configured != "auto":
        return configured
    suffix = path.suffix.lower()
    return next((fmt for fmt, suffixes in SUFFIXES.items() if suffix in suffixes), "text")


def _data_suffixes(configured: str) -> tuple[str, ...]:
    if configured == "chat":
        return SUFFIXES["jsonl"] + SUFFIXES["parquet"]
    return SUFFIXES[configured] if configured != "auto" else sum(SUFFIXES.values(), ())


def _folder_files(folder: Path, configured: str) -> list[Path]:
    suffixes = _data_suffixes(configured)
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in suffixes]
    return sorted(p for p in found if p.is_file())


def _folder_hint(folder: Path, configured: str) -> str:
    suffixes = ", ".join(_data_suffixes(configured))
    try:
        entries = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
    except OSError as exc:
        return f"It cannot be listed ({exc.strerror or exc}); list its files one by one."
    if not entries:
        return f"It holds no files; a folder gives its {suffixes} files."
    names = ", ".join(f'"{p}"' for p in entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return (
        f"A folder gives its {suffixes} files (data.format: {configured}); it holds {len(entries)} others: {names}. "
        f'List such files by name or with a glob pattern (e.g. "{folder}/*{entries[0].suffix}"), '
        "which reads any suffix."
    )


# --- cheap checks ---------------------------------------------------------------------------------


def check_data_files(data: Any, fields: tuple[str, ...] = ("train", "val")) -> None:
    """Refuse an input that names nothing or a file that is missing, unreadable or empty, naming its spec field
    (`data.train[0]: ...`). Cheap (a stat and one small read per file, a Parquet file's footer), for `aic validate`
    and the start of `aic run`; the text itself (UTF-8, JSON, fields) is checked as it is encoded."""
    options = ReadOptions.of(data)
    for key in fields:
        entries = getattr(data, key, None) or []
        if entries:
            for f in expand(entries, f"data.{key}", options):
                check_data_file(f, options)


def check_data_file(f: DataFile, options: ReadOptions = ReadOptions()) -> Path:
    """One data file: a regular file that can be read and is not empty; a Parquet file's text column exists."""
    path = f.path
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(
            f"{f.field}: file not found: {path}. Check the path (relative paths are taken from the spec file's folder)."
        ) from None
    except OSError as exc:
        raise DataError(
            f"{f.where} cannot be read ({exc.strerror or exc}). Check the path and the permissions of its folders."
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{f.where} is not a regular file (a device, pipe or socket). List data files.")
    if path.suffix.lower() in COMPRESSED:
        raise DataError(
            f"{f.where} is compressed ({path.suffix}); aic reads plain text, JSONL and Parquet. "
            f"Decompress it first (e.g. `gunzip -k {path}`)."
        )
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise DataError(
            f"{f.where} cannot be read ({exc.strerror or exc}). Check its permissions (e.g. `chmod a+r {path}`)."
        ) from None
    if not head.strip() and st.st_size <= len(head):
        what = "empty (0 bytes)" if not head else "empty (only whitespace)"
        raise DataError(f"{f.where} is {what}. Give it some text or remove it from the list.")
    if f.format == "parquet" and not options.chat:
        text_column(f, options.text_field)
    return path


def pyarrow_parquet(f: DataFile) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{f.where} is a Parquet file, and reading Parquet needs pyarrow, which is not installed. "
            f"Install it with `{PARQUET_EXTRA}`."
        ) from None
    return pq


def text_column(f: DataFile, name: str) -> Any:
    """The open ParquetFile, after checking that its column `name` holds text (string or binary)."""
    pq = pyarrow_parquet(f)
    try:
        pfile = pq.ParquetFile(f.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError and others for a file it cannot read
        raise DataError(
            f"{f.where} is not a Parquet file pyarrow can read ({exc}). Check the file, "
            "or set data.format if it is text or JSONL."
        ) from None
    schema = pfile.schema_arrow
    if name not in schema.names:
        raise DataError(
            f"data.text_field: '{name}' is not a column of {f.path} ({f.field}){did_you_mean(name, schema.names)}; "
            f"its columns: {', '.join(schema.names[:20])}. "
            "Set data.text_field to the column that holds the documents' text."
        )
    kind = str(schema.field(name).type)
    if kind not in _TEXT_TYPES + _BINARY_TYPES:
        raise DataError(
            f"data.text_field: the column '{name}' of {f.path} ({f.field}) holds {kind}, not text. "
            "Set data.text_field to a string column (its string columns: "
            f"{', '.join(n for n in schema.names if str(schema.field(n).type) in _TEXT_TYPES) or 'none'})."
        )
    return pfile


# --- UTF-8 errors at the file's byte offset ---------------------------------------------------------


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
