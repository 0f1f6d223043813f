"""What several stages say about a file: its SHA-256 (tokenizer hashes, checkpoint manifests, data caches) and a
byte count as a reader wants it. Imports nothing of aic, so any module can use it without an import cycle."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path | str) -> str:
    """The hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def format_bytes(n: int | float) -> str:
    """A byte count in decimal units: `512 bytes`, `1.5 kB`, `12.3 MB`, `1,234.5 GB`."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} bytes"
