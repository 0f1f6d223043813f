"""Corpus -> token ids, encoded once into a memory-mapped array cached by content hash; batches.

Batches are random contiguous windows drawn from a generator seeded by (seed, step, micro-step), so a
batch depends only on the step: the data cursor of a checkpoint is its step, and a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aic_core.errors import DataError
from aic_core.kinds import Tokenizer

_CHUNK_CHARS = 1 << 16  # encode in chunks of whole lines: bounded memory and tokenizer work per call


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


def read_corpus(files: list[str], field: str) -> list[tuple[Path, str]]:
    """Read text files, refusing missing, unreadable or empty ones with the spec field named."""
    if not files:
        raise DataError(f"{field}: no files given; list at least one UTF-8 text file.")
    texts = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{field}: file not found: {path}. Check the path (relative paths are taken from the spec file's folder).")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{field}: {path} is not UTF-8 text (byte {exc.start}). Convert it to UTF-8.") from None
        if not text.strip():
            raise DataError(f"{field}: {path} is empty. Give it some text or remove it from the list.")
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
    cache_dir.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = cache_dir / f"{digest}.bin", cache_dir / f"{digest}.json"
    if bin_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        ids = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        return TokenData(ids, meta["n_bytes"])

    all_ids: list[int] = []
    for _, text in texts:
        all_ids.extend(_encode_text(text, tokenizer))
        if tokenizer.eos_id is not None:
            all_ids.append(tokenizer.eos_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    array = np.asarray(all_ids, dtype=dtype)
    n_bytes = sum(len(text.encode("utf-8")) for _, text in texts)
    tmp = bin_path.with_name(f".{bin_path.name}.{os.getpid()}.tmp")
    array.tofile(tmp)
    os.replace(tmp, bin_path)
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps({"dtype": np.dtype(dtype).name, "n_tokens": len(array), "n_bytes": n_bytes}))
    os.replace(tmp_meta, meta_path)
    ids = np.memmap(bin_path, dtype=dtype, mode="r", shape=(len(array),))
    return TokenData(ids, n_bytes)


def load_splits(
    train_files: list[str],
    val_files: list[str],
    val_fraction: float,
    tokenizer: Tokenizer,
    tokenizer_hash: str,
    cache_dir: Path,
    seq_len: int,
) -> tuple[TokenData, TokenData]:
    """Training and validation tokens: the val files, or the last `val_fraction` of the training tokens."""
    train = encode_files(train_files, "data.train", tokenizer, tokenizer_hash, cache_dir)
    if val_files:
        val = encode_files(val_files, "data.val", tokenizer, tokenizer_hash, cache_dir)
    else:
        n_val = max(int(len(train) * val_fraction), seq_len + 2)
        cut = len(train) - n_val
        val_ids = train.ids[cut:]
        # Bytes of the held-out tail, measured on its decoded text, so bits per byte is exact.
        val_bytes = len(tokenizer.decode([int(i) for i in val_ids]).encode("utf-8"))
        val = TokenData(val_ids, val_bytes)
        train = TokenData(train.ids[:cut], train.n_bytes - val_bytes)
    for data, field in ((train, "data.train"), (val, "data.val" if val_files else "data.val_fraction")):
        if len(data) < seq_len + 2:
            raise DataError(
                f"{field}: only {len(data)} tokens, fewer than one window of train.seq_len + 1 = {seq_len + 1}. "
                f"Add more text, or lower train.seq_len / model.block_size."
            )
    return train, val
