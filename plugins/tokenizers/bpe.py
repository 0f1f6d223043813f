"""Byte-level BPE on Hugging Face `tokenizers` (the Rust library): GPT-2's kind of tokenizer, trained on the run's
corpus with every core, or loaded from any `tokenizer.json` that `tokenizers` reads.

Every byte is in the alphabet (GPT-2's byte-to-unicode map), so decode(encode(text)) == text for any text, with no
unknown token; ids cut inside a multi-byte character decode to U+FFFD. The pre-tokenizer splits text before the
merges: GPT-2's regex, a GPT-4-style regex (cl100k-like: digits in groups of 1-3, as tiktoken and nanochat do) or
none. Ids: `<|endoftext|>` (the eos, between documents) is 0, then the 256 bytes, then the merges. `encode` adds
no eos. The tokenizer is one file, `tokenizers`' own tokenizer.json.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from aic_core.errors import DataError, SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Tokenizer, TokenizerPlugin

EOS = "<|endoftext|>"
ALPHABET = 256  # byte-level: every byte is a token
# GPT-4's (cl100k) pattern, with digits split in groups of 1-3: contractions, words with one leading non-letter,
# numbers, punctuation runs with a leading space, newlines, other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# Tokens a loaded tokenizer.json may use for the end of a document, in the order they are looked for.
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
INSTALL = 'the bpe tokenizer needs Hugging Face tokenizers: pip install "tokenizers>=0.19"'


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise SpecError(f"tokenizer.type: {INSTALL}") from None
    return tokenizers


class BPETokenizer(Tokenizer):
    """A loaded `tokenizers.Tokenizer`; pickles as its JSON (for the data stage's encoding workers)."""

    def __init__(self, tok: Any, path: Path | None = None) -> None:
        self.tok, self.path = tok, path
        self.training_sample: str | None = None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for i in map(tok.token_to_id, EOS_NAMES) if i is not None), None)
        self.bos_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        for pos, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                where = f" ({self.path})" if self.path else ""
                raise DataError(
                    f"token id {i} at position {pos} is out of range for this tokenizer{where}, whose ids are "
                    f"0..{self.vocab_size - 1}. Decode ids with the tokenizer they were made with."
                )
        return self.tok.decode(ids, skip_special_tokens=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self.tok.to_str(), "path": self.path, "training_sample": self.training_sample}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(_tokenizers().Tokenizer.from_str(state["json"]), state["path"])
        self.training_sample = state["training_sample"]


class BPE(TokenizerPlugin):
    """Byte-level BPE (GPT-2's kind), trained with Hugging Face tokenizers; any text round-trips exactly."""

    name = "bpe"
    trains = True
    # Not yet an HF folder's tokenizer: aic's sentencepiece exports carry a tokenizer.json too, so claiming that
    # name needs the rule for folders with tokenizer files of two kinds (issue 25, parts 1 and 7).
    hf_files = ()

    class Options(PluginOptions):
        """Byte-level BPE training options (Hugging Face tokenizers)."""

        vocab_size: int = Field(8192, ge=ALPHABET + 2, description="Tokens in all: the eos, 256 bytes, the merges.")
        min_frequency: int = Field(2, ge=1, description="A pair is merged only if it occurs at least this often.")
        pre_tokenizer: Literal["gpt2", "gpt4", "none"] = Field(
            "gpt2",
            description="How text is split before the merges: GPT-2's regex, a GPT-4-style (cl100k) regex that "
            "splits digits in groups of 1-3, or none (merges may cross words and spaces).",
        )

    def train(self, options: PluginOptions, files: list[Path], path: Path) -> Tokenizer:
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = _pre_tokenizer(tk, options.pre_tokenizer)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=options.vocab_size,
            min_frequency=options.min_frequency,
            special_tokens=[EOS],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train([str(f) for f in files], trainer)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tok.save(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        out = BPETokenizer(tok, path)
        size = sum(Path(f).stat().st_size for f in files)
        out.training_sample = f"tokenizers read all {size / 1e6:.1f} MB"
        return out

    def load(self, options: PluginOptions, path: Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{path}: tokenizer file not found. Run the tokenizer stage (`aic run SPEC --stage tokenizer`) "
                "or restore the file."
            )
        try:
            tok = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a file it cannot read
            raise DataError(
                f"{path}: not a tokenizer.json that Hugging Face tokenizers can read ({str(exc)[:200]}). "
                "The spec's tokenizer.type does not match the file; use the tokenizer the run was made with."
            ) from None
        return BPETokenizer(tok, path)


def _pre_tokenizer(tk: Any, kind: str) -> Any:
    byte_level = tk.pre_tokenizers.ByteLevel
    if kind == "gpt2":
        return byte_level(add_prefix_space=False, use_regex=True)
    if kind == "gpt4":
        split = tk.pre_tokenizers.Split(tk.Regex(GPT4_PATTERN), behavior="isolated")
        return tk.pre_tokenizers.Sequence([split, byte_level(add_prefix_space=False, use_regex=False)])
    return byte_level(add_prefix_space=False, use_regex=False)


@hookimpl
def aic_register_tokenizers(register):
    register(BPE)
