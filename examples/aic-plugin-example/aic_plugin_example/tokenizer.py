"""A byte-level tokenizer: ids 0-255 are the UTF-8 bytes of the text, and (with `eos`) id 256 ends a
document. Nothing is learned, so `trains = False`; `train` still writes the single tokenizer file the run
directory and every checkpoint carry: a small JSON descriptor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field

from aic_core.errors import DataError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Tokenizer, TokenizerPlugin

FORMAT = "aic-plugin-example/bytes"
VERSION = 1


class ByteTokenizer(Tokenizer):
    bos_id = None

    def __init__(self, eos: bool) -> None:
        self.eos_id = 256 if eos else None
        self.vocab_size = 257 if eos else 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        data = bytearray()
        for pos, i in enumerate(ids):
            i = int(i)
            if i == self.eos_id:
                continue  # end of a document: no text
            if not 0 <= i < 256:
                raise DataError(
                    f"token id {i} at position {pos} is out of range for the bytes tokenizer (ids 0..{self.vocab_size - 1}). "
                    "The ids come from another tokenizer; decode them with the one they were made with."
                )
            data.append(i)
        # A cut through a multi-byte character (a window of a corpus, a token still being generated) shows as U+FFFD.
        return data.decode("utf-8", errors="replace")


class Bytes(TokenizerPlugin):
    """UTF-8 bytes as tokens: 256 ids (257 with eos); no training, every text round-trips exactly."""

    name = "bytes"
    trains = False

    class Options(PluginOptions):
        """The bytes tokenizer: ids 0-255 are UTF-8 bytes."""

        eos: bool = Field(True, description="Reserve id 256 as end-of-text, put between documents (vocab_size 257).")

    def train(self, options: PluginOptions, files: list[Path], path: Path) -> Tokenizer:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "eos": options.eos}) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return ByteTokenizer(options.eos)

    def load(self, options: PluginOptions, path: Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found. Run the tokenizer stage (`aic run SPEC --stage tokenizer`) or restore the file.")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("eos"), bool):
            raise DataError(
                f"{path}: not a bytes tokenizer file (expected JSON with \"format\": \"{FORMAT}\"). "
                "The spec's tokenizer.type does not match the file; use the tokenizer the run was made with."
            )
        return ByteTokenizer(meta["eos"])


@hookimpl
def aic_register_tokenizers(register):
    register(Bytes)
