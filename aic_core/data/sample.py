"""A bounded, deterministic sample of a text corpus, for training a tokenizer in bounded memory.

`sample_corpus` gives the files as they are when they hold at most `max_bytes`; else one text file of at most
`max_bytes`, drawn evenly from all of them: each file contributes a share proportional to its size, taken as evenly
spaced windows (about WINDOW_BYTES each; a small share in up to MIN_WINDOWS smaller ones) from its first line to its
last. A window starts at the beginning of a line and ends at the end of one (only a line longer than a window is cut,
at a character boundary), and windows are separated by a blank line, so no paragraph of the sample joins text from
two places. Files are read with seek and read, a window at a time: memory is O(window), whatever the corpus. Nothing
is random: the same files and `max_bytes` give the same bytes.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aic_core.errors import DataError

WINDOW_BYTES = 1 << 20  # the size of a window when a file's share is large: many windows, spread through it
MIN_WINDOWS = 16  # a smaller share is still spread over up to this many windows,
MIN_WINDOW_BYTES = 16 << 10  # of at least this size (whole lines are kept; a window much shorter would lose many)
SCAN_BYTES = 1 << 16  # how far a window looks for the start of a line before it starts at a character instead
SEPARATOR = b"\n\n"  # between windows: a blank line
PREFIX = ".tokenizer-text-"  # the temporary folder's name; the run's tokenizer stage removes what a kill left


@dataclass
class _Taken:
    windows: int = 0
    bytes: int = 0
    has_text: bool = False


@contextmanager
def sample_corpus(files: list[Path], max_bytes: int | None, folder: Path) -> Iterator[tuple[list[Path], str | None]]:
    """Yield (files, None) when the files hold at most `max_bytes` (or `max_bytes` is None or 0: no limit); else
    ([one sample file of at most max_bytes], a line for the log). The sample lives in a temporary folder under
    `folder` (named `.tokenizer-text-*`), deleted afterwards, also on errors."""
    files = [Path(f) for f in files]
    sizes = [_size(f) for f in files]
    total = sum(sizes)
    if not max_bytes or total <= max_bytes:
        yield files, None
        return
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=PREFIX, dir=folder) as tmp:
        path = Path(tmp) / "sample.txt"
        taken = _Taken()
        with open(path, "wb") as out:
            for f, size in zip(files, sizes):
                share = max_bytes * size // total  # the shares sum to at most max_bytes
                if share > len(SEPARATOR):
                    _sample_file(f, size, share, out, taken)
        if not taken.has_text:
            names = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataError(
                f"{names}: the sample of data.train for the tokenizer holds no text (only whitespace) in "
                f"{taken.windows:,} windows spread over the files. Give data.train some text."
            )
        plural = "s" if len(files) != 1 else ""
        described = (
            f"sampled {taken.bytes / 1e6:,.1f} MB of {total / 1e6:,.1f} MB: {taken.windows:,} windows spread evenly "
            f"over {len(files):,} file{plural}"
        )
        yield [path], described


def _size(f: Path) -> int:
    try:
        with open(f, "rb"):
            pass
        return f.stat().st_size
    except OSError as exc:
        raise _unreadable(f, exc) from None


def _sample_file(f: Path, size: int, share: int, out: BinaryIO, taken: _Taken) -> None:
    """`share` bytes of `f` (separators included) as evenly spaced windows, appended to `out`."""
    n = max(1, math.ceil(share / WINDOW_BYTES), min(MIN_WINDOWS, share // MIN_WINDOW_BYTES))
    length = share // n - len(SEPARATOR)
    if length < 1:
        n, length = 1, share - len(SEPARATOR)
    end = 0  # where the last window ended: windows never overlap
    try:
        fh = open(f, "rb")
    except OSError as exc:
        raise _unreadable(f, exc) from None
    with fh:
        for k in range(n):
            start = 0 if n == 1 else k * (size - length) // (n - 1)  # the first at 0, the last at the end
            try:
                start, text = _window(fh, max(start, end), length, size)
            except OSError as exc:
                raise _unreadable(f, exc) from None
            if not text:
                continue
            end = start + len(text)
            try:
                decoded = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{f}: not UTF-8 text (an invalid byte at offset {start + exc.start:,}). Convert it to UTF-8 "
                    "(e.g. `iconv -f latin1 -t utf-8`) or remove it from data.train."
                ) from None
            taken.has_text = taken.has_text or not decoded.isspace()
            separator = SEPARATOR[1:] if text.endswith(b"\n") else SEPARATOR
            out.write(text + separator)  # an OSError here (a full disk) is the caller's to report
            taken.windows += 1
            taken.bytes += len(text) + len(separator)


def _unreadable(f: Path, exc: OSError) -> DataError:
    return DataError(
        f"{f}: cannot be read to sample it for the tokenizer ({exc.strerror or exc}). "
        "Check that the file exists and is readable by this user, or remove it from data.train."
    )


def _window(fh: BinaryIO, start: int, length: int, size: int) -> tuple[int, bytes]:
    """Up to `length` bytes of whole lines from the first line that starts at or after `start`: (where they begin,
    the bytes). A line longer than the window is cut at a character boundary rather than left out; the file's end
    ends a window too."""
    if start >= size:
        return start, b""
    if start > 0:
        fh.seek(start - 1)
        if fh.read(1) != b"\n":
            start = _next_line(fh, start, size)
            if start >= size:
                return start, b""
    fh.seek(start)
    block = fh.read(length)
    if start + len(block) >= size:  # the file's end: its last line, even without a newline
        return start, block
    cut = block.rfind(b"\n")
    return start, block[: cut + 1] if cut >= 0 else _whole_characters(block)


def _next_line(fh: BinaryIO, start: int, size: int) -> int:
    """Just after the first newline at or after `start`, looking SCAN_BYTES ahead; past that, the first character
    boundary at `start` (a line that long is sampled from its middle)."""
    fh.seek(start)
    head = fh.read(SCAN_BYTES)
    nl = head.find(b"\n")
    if nl >= 0:
        return start + nl + 1
    if start + len(head) >= size:
        return size
    skip = 0
    while skip < min(4, len(head)) and head[skip] & 0xC0 == 0x80:  # UTF-8 continuation bytes
        skip += 1
    return start + skip


def _whole_characters(block: bytes) -> bytes:
    """`block` without a UTF-8 character cut at its end."""
    end = len(block)
    back = 0
    while back < min(4, end) and block[end - 1 - back] & 0xC0 == 0x80:
        back += 1
    lead = end - 1 - back  # the last character's first byte
    if lead < 0:
        return block[:0]
    b = block[lead]
    need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
    return block if back + 1 >= need else block[:lead]
