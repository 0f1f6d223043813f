"""SentencePiece tokenizer (BPE or unigram), configured so that text survives exactly.

decode(encode(text)) == text for any text the vocabulary covers (with byte fallback: any text): no
Unicode normalisation, no whitespace clean-up, no dummy prefix, and the trainer sees whole
paragraphs, so newlines, blank lines, runs of spaces and tabs are learned like any other character.
The tokenizer is one file, the SentencePiece `.model`, loadable by `sentencepiece` alone. An HF export
also gets tokenizer.json and tokenizer_config.json, for `transformers.AutoTokenizer` (see `hf_tokenizer_files`).

Ids: unk=0, bos=1, eos=2 (SentencePiece's defaults), then the special tokens, then the 256 byte
pieces (with byte_fallback), then the learned pieces. `encode` adds no bos/eos.

Special tokens (`tokenizer.special_tokens`) are SentencePiece control symbols: `encode` never produces them from
text (a typed "<|user|>" is its characters), `encode_with_special` does, and `decode` writes them, bos and eos
too, as their text (as transformers and tiktoken do; SentencePiece itself drops control pieces). Tokenizers
trained by earlier versions of aic hold them as user-defined symbols, which text does produce; they load and
encode as they did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
from pydantic import Field, field_validator

from aic_core.data.inputs import where_not_utf8
from aic_core.errors import DataError, SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Tokenizer, TokenizerPlugin, check_special_tokens

RESERVED = ("<unk>", "<s>", "</s>", "<pad>")  # SentencePiece's own meta pieces
META_PIECES = 3  # unk, bos, eos
BYTE_PIECES = 256
SPACE = "\u2581"  # "▁": SentencePiece's stand-in for a space
MAX_SENTENCE_CHARS = 4096  # training "sentences" are paragraphs cut to at most this many characters
SEED = 1234  # SentencePiece samples and shuffles sentences; fixed, so one corpus gives one tokenizer

# The trainer settings that make decode(encode(text)) == text; see the module docstring.
EXACT_TEXT = {
    "normalization_rule_name": "identity",  # no NFKC: "é", "—", "…", full-width forms stay as they are
    "remove_extra_whitespaces": False,  # keep leading, trailing and repeated spaces
    "add_dummy_prefix": False,  # no invented leading space: encode(a) + encode(b) == encode-able a + b
    "allow_whitespace_only_pieces": True,  # runs of spaces (indentation) can become one piece
    "split_digits": False,
    "required_chars": "\n",  # newline is always in the alphabet, even at character_coverage < 1
    "max_sentence_length": 4 * MAX_SENTENCE_CHARS,  # bytes; a paragraph chunk never exceeds it
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "minloglevel": 2,  # errors only: SentencePiece logs every training step otherwise
}

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_FEW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_LOCATION = re.compile(r"^[A-Z_]+: \S+\(\d+\) \[[^\]]*\]\s*")  # "INTERNAL: src/x.cc(744) [check] "


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model: `encode` gives ids without bos/eos, `decode` inverts it exactly. It pickles as
    its model's bytes (for the data stage's encoding workers)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None) -> None:
        self.processor = processor
        self.path = path
        self.training_sample: str | None = (
            None  # set by `train`: how many paragraphs SentencePiece saw, for the run log
        )
        self.vocab_size = processor.get_piece_size()
        self.bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
        self.eos_id = processor.eos_id() if processor.eos_id() >= 0 else None
        self.unk_id = processor.unk_id()
        size = self.vocab_size
        self._controls = {i: processor.id_to_piece(i) for i in range(size) if processor.is_control(i)}
        # The specials, bos, eos and unk ("<unk>": decoded " ⁇ " as SentencePiece does), as transformers counts them.
        self.special_ids = {piece: i for i, piece in self._controls.items()} | {
            processor.id_to_piece(self.unk_id): self.unk_id
        }
        # A literal "▁" in the text would decode as a space; with byte pieces it is encoded as its
        # three UTF-8 bytes instead, which decode back to "▁".
        byte_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode("utf-8")]
        self._space_bytes = byte_ids if all(processor.is_byte(i) for i in byte_ids) else None

    def encode(self, text: str) -> list[int]:
        if self._space_bytes is None or SPACE not in text:
            return self.processor.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE)):
            if i:
                ids.extend(self._space_bytes)
            if part:
                ids.extend(self.processor.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for pos, i in enumerate(ids):
            if not 0 <= i < n:
                where = f" ({self.path})" if self.path else ""
                raise DataError(
                    f"token id {i} at position {pos} is out of range for this tokenizer{where}, "
                    f"whose ids are 0..{n - 1}. The ids come from a model or tokenizer other than this one; "
                    "decode them with the tokenizer they were made with."
                )
        if not self._controls or not any(i in self._controls for i in ids):
            return self.processor.decode(ids)
        parts, start = [], 0
        for pos, i in enumerate(ids):
            if i in self._controls:
                parts += [self.processor.decode(ids[start:pos]), self._controls[i]]
                start = pos + 1
        return "".join([*parts, self.processor.decode(ids[start:])])

    def piece(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "model": self.processor.serialized_model_proto(),
            "path": self.path,
            "training_sample": self.training_sample,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(state["model"])
        self.__init__(processor, state["path"])
        self.training_sample = state["training_sample"]


class SentencePiece(TokenizerPlugin):
    """SentencePiece BPE or unigram, trained on the run's corpus; exact round trip of whitespace and Unicode."""

    name = "sentencepiece"
    trains = True
    hf_files = ("tokenizer.model",)  # Llama-family HF folders ship their sentencepiece model under this name

    class Options(PluginOptions):
        """SentencePiece training options. Text is never normalised; newlines and spaces are kept."""

        vocab_size: int = Field(
            4096,
            gt=0,
            description="Number of pieces, including unk/bos/eos, the special tokens and (with byte_fallback) "
            "the 256 byte pieces.",
        )
        model_type: Literal["bpe", "unigram"] = Field("bpe", description="The segmentation algorithm.")
        character_coverage: float = Field(
            1.0,
            gt=0,
            le=1,
            description="Share of the corpus's characters that get their own piece; "
            "the rarest others go to byte pieces (or unk).",
        )
        byte_fallback: bool = Field(
            True,
            description="Spell characters outside the vocabulary as UTF-8 byte pieces, "
            "so every text round-trips; costs 256 ids.",
        )
        special_tokens: list[str] = Field(
            default_factory=list,
            description="Tokens with one id each that text never produces: e.g. '<|user|>', '<|end|>' for chat "
            "templates. A document or prompt that holds the same characters encodes them as text; a chat template's "
            "rendering asks for the tokens (Tokenizer.encode_with_special).",
        )
        input_sentence_size: int = Field(
            2_000_000,
            ge=0,
            description="Paragraphs SentencePiece samples from the whole corpus as it streams by (reservoir sampling), "
            "which bounds its memory: at most this many paragraphs of at most 4,096 characters. 0: all of them.",
        )
        num_threads: int | None = Field(
            None,
            gt=0,
            description="Training threads (default: 1). SentencePiece trains byte-identical tokenizers run after run "
            "at one thread count, but not across counts (measured: 1 and 2 threads differ), so the default is one "
            "thread on every machine: one spec, one tokenizer. More threads train faster (2: about 1.5x).",
        )

        @field_validator("input_sentence_size")
        @classmethod
        def _input_sentence_size(cls, size: int) -> int:
            if 0 < size <= 100:
                raise ValueError(
                    "SentencePiece samples more than 100 paragraphs or all of them; set it above 100, "
                    "or to 0 for all (memory grows with it)"
                )
            return size

        @field_validator("special_tokens")
        @classmethod
        def _special_tokens(cls, tokens: list[str]) -> list[str]:
            for token in check_special_tokens(tokens):
                if any(ch.isspace() for ch in token) or SPACE in token:
                    raise ValueError(
                        f"special token {token!r} contains whitespace; SentencePiece cannot keep it as one piece. "
                        "Use a token without spaces or newlines"
                    )
                if token in RESERVED or re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                    raise ValueError(
                        f"special token {token!r} is one of SentencePiece's own pieces ({', '.join(RESERVED)}, "
                        "<0x00>..<0xFF>); choose another name"
                    )
            return tokens

    # --- checks -------------------------------------------------------------------------------

    @staticmethod
    def minimum_vocab_size(options: PluginOptions) -> int:
        """unk/bos/eos + special tokens + byte pieces + newline: what any corpus needs at least."""
        return META_PIECES + len(options.special_tokens) + (BYTE_PIECES if options.byte_fallback else 0) + 1

    def planned_special_tokens(self, options: PluginOptions) -> list[str]:
        return ["<unk>", "<s>", "</s>", *options.special_tokens]

    def check(self, options: PluginOptions, spec: Any) -> None:
        self._check_vocab_size(options)

    def _check_vocab_size(self, options: PluginOptions) -> None:
        minimum = self.minimum_vocab_size(options)
        if options.vocab_size < minimum:
            parts = [f"{META_PIECES} for unk/bos/eos"]
            if options.special_tokens:
                parts.append(f"{len(options.special_tokens)} for special_tokens")
            if options.byte_fallback:
                parts.append(f"{BYTE_PIECES} for byte_fallback")
            parts.append("1 for newline, plus the corpus's characters")
            hint = " or set tokenizer.byte_fallback to false" if options.byte_fallback else ""
            raise SpecError(
                f"tokenizer.vocab_size: {options.vocab_size} is too small; it needs at least {minimum} "
                f"({', '.join(parts)}). Raise tokenizer.vocab_size well above {minimum}{hint}."
            )

    # --- train / load -------------------------------------------------------------------------

    def train(self, options: PluginOptions, files: list[Path], path: Path) -> Tokenizer:
        self._check_vocab_size(options)
        files = [Path(f) for f in files]
        if not files:
            raise DataError("tokenizer: no training files given. List at least one text file under data.train.")
        for f in files:
            if not f.exists():
                raise DataError(
                    f"{f}: training file not found. Check the path under data.train (relative paths are taken from the "
                    "spec file's folder)."
                )
            if not f.is_file():
                raise DataError(f"{f}: not a file. List text files under data.train, not folders.")

        _check_text(files)  # before SentencePiece: some versions abort the process on an empty corpus
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        reader = _CorpusReader(files)
        num_threads = options.num_threads or 1  # see Options.num_threads: one spec, one tokenizer
        trainer_options = dict(
            EXACT_TEXT,
            model_type=options.model_type,
            vocab_size=options.vocab_size,
            character_coverage=options.character_coverage,
            byte_fallback=options.byte_fallback,
            input_sentence_size=options.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
        )
        if options.special_tokens:  # control symbols: never produced from text, only by id
            trainer_options["control_symbols"] = list(options.special_tokens)

        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            tmp = tmp_dir / path.name
            spm.set_random_generator_seed(SEED)
            failure: RuntimeError | None = None
            with open(tmp, "wb") as out:
                try:
                    spm.SentencePieceTrainer.train(sentence_iterator=iter(reader), model_writer=out, **trainer_options)
                except RuntimeError as exc:
                    failure = exc
                out.flush()
                os.fsync(out.fileno())
            if reader.error is not None:
                raise reader.error
            if not reader.has_text:
                names = ", ".join(str(f) for f in files)
                raise DataError(
                    f"{names}: the training corpus is empty (only whitespace). "
                    "Give the tokenizer some text to train on."
                )
            if failure is not None:
                raise _translate(failure, options, files) from None
            tokenizer = _load(tmp)  # refuse to install a model that does not load
            os.replace(tmp, path)
            tokenizer.path = path
            tokenizer.training_sample = reader.sample(options.input_sentence_size)
            return tokenizer
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def load(self, options: PluginOptions, path: Path) -> Tokenizer:
        return _load(Path(path))

    def hf_tokenizer_files(self, options: PluginOptions, path: Path, model_max_length: int) -> dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json for AutoTokenizer; see "Hugging Face tokenizer files" below."""
        return hf_tokenizer_files(Path(path), model_max_length)


# --- helpers ----------------------------------------------------------------------------------


def _load(path: Path) -> SentencePieceTokenizer:
    if not path.is_file():
        raise DataError(
            f"{path}: tokenizer file not found. Train it with the run's tokenizer stage (`aic run SPEC --stage "
            "tokenizer`) or restore the file."
        )
    data = path.read_bytes()
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as exc:
        raise DataError(
            f"{path}: not a valid SentencePiece model ({_clean(exc) or 'it does not parse'}). The file is corrupt or "
            "not a tokenizer; retrain it with the tokenizer stage or restore it from a checkpoint."
        ) from None
    if processor.get_piece_size() == 0:
        raise DataError(
            f"{path}: not a valid SentencePiece model (it holds no pieces). "
            "Retrain it with the tokenizer stage or restore it from a checkpoint."
        )
    return SentencePieceTokenizer(processor, path)


def _clean(exc: BaseException) -> str:
    """SentencePiece's message without its 'INTERNAL: src/file.cc(123) [check]' prefix."""
    return _LOCATION.sub("", str(exc)).strip()


def _translate(exc: RuntimeError, options: PluginOptions, files: list[Path]) -> Exception:
    msg = str(exc)
    if m := _TOO_HIGH.search(msg):
        largest = int(m.group(2))
        return SpecError(
            f"tokenizer.vocab_size: {options.vocab_size} is more than this corpus can support; "
            f"SentencePiece can make at most {largest} pieces from it. "
            f"Lower tokenizer.vocab_size to {largest} or less (well below is better), or train on more text."
        )
    if m := _TOO_FEW.search(msg):
        needed = int(m.group(2))
        return SpecError(
            f"tokenizer.vocab_size: {options.vocab_size} is too small for this corpus: "
            f"its characters plus the reserved pieces need at least {needed}. Raise tokenizer.vocab_size to at least "
            f"{needed} (well above leaves room for learned pieces), or lower tokenizer.character_coverage."
        )
    if "sentences_.empty()" in msg:
        names = ", ".join(str(f) for f in files)
        return DataError(
            f"{names}: SentencePiece found no usable text to train on. Check that the files hold plain text."
        )
    return DataError(
        f"tokenizer: SentencePiece could not train on {', '.join(str(f) for f in files)}: {_clean(exc) or msg}. "
        "Check the files and tokenizer options."
    )


def _check_text(files: list[Path]) -> None:
    """Every file is UTF-8, and together they hold some non-whitespace text (one streaming pass)."""
    has_text = False
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                for block in iter(lambda: fh.read(1 << 20), ""):
                    has_text = has_text or not block.isspace()
        except UnicodeDecodeError:
            raise DataError(
                f"{f}: not UTF-8 text: {where_not_utf8(f)}. Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
            ) from None
        except OSError as exc:
            raise DataError(
                f"{f}: cannot be read ({exc.strerror or exc}). Check the file and its permissions."
            ) from None
    if not has_text:
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{names}: the training corpus is empty (only whitespace). Give data.train some text.")


class _CorpusReader:
    """Yields the corpus as paragraphs (lines up to and including a blank line), newlines kept,
    each at most MAX_SENTENCE_CHARS long. Read errors are kept in `error` (SentencePiece would
    turn them into an opaque RuntimeError) and end the iteration."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.error: DataError | None = None
        self.has_text = False
        self.paragraphs = 0  # yielded so far, and their characters: what SentencePiece sampled from
        self.chars = 0

    def sample(self, input_sentence_size: int) -> str:
        """What SentencePiece trained on, for the run log. It keeps a uniform sample of `input_sentence_size`
        paragraphs (reservoir sampling, seeded) as they stream by, so memory is bounded by that many paragraphs of at
        most MAX_SENTENCE_CHARS each, never by the corpus."""
        read = f"{self.paragraphs:,} paragraphs, {self.chars / 1e6:,.1f}M characters"
        if input_sentence_size and self.paragraphs > input_sentence_size:
            return f"SentencePiece sampled {input_sentence_size:,} (tokenizer.input_sentence_size) of {read}"
        return f"SentencePiece read all {read}" + (
            f" (within tokenizer.input_sentence_size {input_sentence_size:,})" if input_sentence_size else ""
        )

    def __iter__(self) -> Iterator[str]:
        for f in self.files:
            try:
                yield from self._paragraphs(f)
            except UnicodeDecodeError:
                self.error = DataError(
                    f"{f}: not UTF-8 text: {where_not_utf8(f)}. Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                )
                return
            except OSError as exc:
                self.error = DataError(
                    f"{f}: cannot be read ({exc.strerror or exc}). Check the file and its permissions."
                )
                return

    def _paragraphs(self, f: Path) -> Iterator[str]:
        buf: list[str] = []
        size = 0
        with open(f, encoding="utf-8") as fh:  # universal newlines, as the data pipeline reads it
            for line in fh:
                if size + len(line) > MAX_SENTENCE_CHARS and buf:
                    yield self._emit(buf)
                    buf, size = [], 0
                while len(line) > MAX_SENTENCE_CHARS:  # a very long line: cut it, before a space where possible
                    cut = line.rfind(" ", MAX_SENTENCE_CHARS // 2, MAX_SENTENCE_CHARS)
                    cut = cut if cut > 0 else MAX_SENTENCE_CHARS
                    yield self._emit([line[:cut]])
                    line = line[cut:]
                buf.append(line)
                size += len(line)
                if not line.strip():
                    yield self._emit(buf)
                    buf, size = [], 0
        if buf:
            yield self._emit(buf)

    def _emit(self, lines: list[str]) -> str:
        text = "".join(lines)
        self.paragraphs += 1
        self.chars += len(text)
        if not self.has_text and text.strip():
            self.has_text = True
        return text


# --- Hugging Face tokenizer files ----------------------------------------------------------------
#
# tokenizer.json is this SentencePiece model rebuilt in the `tokenizers` library, piece for piece (same ids):
# - BPE: SentencePiece merges, again and again, the adjacent pair whose union is the best-scoring piece; in
#   `tokenizers` that is one merge per way of splitting a piece in two pieces, ranked by the piece's score.
# - unigram: the pieces and their scores (both pick the best segmentation). `tokenizers` would also match the
#   control and byte pieces ("<s>", "<0x41>") inside a text, which SentencePiece never does; a "<" is made a
#   piece of its own to prevent that, as long as no learned piece holds a "<". (Without byte fallback, an
#   unknown "<" beside another unknown character is then two <unk>, where SentencePiece fuses them in one.)
# - no normalizer or pre-tokenizer (aic trains with none), byte fallback as trained, and the pieces' "▁"
#   spelled as the space it stands for: a literal "▁" in a text then matches no piece and falls back to its
#   three bytes, as SentencePieceTokenizer.encode does. (Without byte fallback, "▁" reads as a space, as there.)
# tokenizer_config.json names PreTrainedTokenizerFast, which takes tokenizer.json as it is on transformers 4.x
# and 5.x and has no slow twin (use_fast=False loads the same). Not LlamaTokenizer(Fast): 5.x rebuilds that
# one with its own "▁" handling (and BPE only), and 4.x converts it from the slow SentencePiece tokenizer,
# which needs protobuf, whenever add_prefix_space is set. Special tokens follow transformers' convention: its
# tokenizer(text) matches "<s>" or "<|user|>" in a text (as a chat template's rendering needs), which is aic's
# encode_with_special; tokenizer(text, split_special_tokens=True) reads them as text, which is aic's encode.

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED = 1, 2, 3, 4  # SentencePiece's piece types
UNIGRAM, BPE = 1, 2  # TrainerSpec.model_type


def hf_tokenizer_files(path: Path, model_max_length: int) -> dict[str, bytes]:
    pieces, trainer, normalizer = _read_model_proto(path.read_bytes())
    if why := _not_reproducible(trainer, normalizer):
        warnings.warn(
            f"{path}: this SentencePiece model was not trained by aic ({why}), and the tokenizer.json aic writes "
            "reproduces only aic's settings; the export carries tokenizer.model alone, "
            "which sentencepiece reads exactly (transformers.AutoTokenizer will not load it).",
            stacklevel=2,
        )
        return {}
    names = [piece.replace(SPACE, " ") if kind == PIECE_NORMAL else piece for piece, _, kind in pieces]
    processor = _load(path).processor
    roles = (("unk", processor.unk_id()), ("bos", processor.bos_id()), ("eos", processor.eos_id()))
    # unk, bos, eos and tokenizer.special_tokens (control pieces: special, never produced from text by aic), and the
    # user-defined pieces of tokenizers made by earlier aic versions (not special: text produces them). llama.cpp
    # reads them here.
    added = {
        str(i): {
            "content": names[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": kind != PIECE_USER_DEFINED,
        }
        for i, (_, _, kind) in enumerate(pieces)
        if kind in (PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,  # llama.cpp's convert_hf_to_gguf.py writes it as tokenizer.ggml.add_space_prefix
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **{f"{role}_token": names[i] for role, i in roles if i >= 0},
        "added_tokens_decoder": added,
    }
    files = {"tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()}
    try:
        files["tokenizer.json"] = _tokenizer_json(pieces, names, trainer.get(3, UNIGRAM), bool(trainer.get(35, 0)))
    except ImportError as exc:
        warnings.warn(
            f"{exc}, so the export has no tokenizer.json and transformers.AutoTokenizer cannot load it "
            "(tokenizer.model and tokenizer_config.json are written). "
            "`pip install -U tokenizers` (transformers brings it) and export again.",
            stacklevel=2,
        )
    return files


def _tokenizer_json(
    pieces: list[tuple[str, float, int]], names: list[str], model_type: int, byte_fallback: bool
) -> bytes:
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the `tokenizers` package is not installed") from None
    if tuple(int(x) for x in tokenizers.__version__.split(".")[:2]) < (
        0,
        20,
    ):  # BPE merges as pairs, as pieces hold spaces
        raise ImportError(
            f"tokenizers {tokenizers.__version__} is older than 0.20, the first to read the tokenizer.json aic writes"
        )
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

    kinds = [kind for _, _, kind in pieces]
    unk = kinds.index(PIECE_UNKNOWN)
    learned = [name for name, kind in zip(names, kinds) if kind == PIECE_NORMAL]
    if model_type == BPE:
        known = set(learned)
        best_first = [
            names[i] for i in sorted(range(len(pieces)), key=lambda i: -pieces[i][1]) if kinds[i] == PIECE_NORMAL
        ]
        merges = [
            (name[:k], name[k:])
            for name in best_first
            for k in range(1, len(name))
            if name[:k] in known and name[k:] in known
        ]
        model = models.BPE(
            {name: i for i, name in enumerate(names)},
            merges,
            unk_token=names[unk],
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    else:
        model = models.Unigram(
            [(name, score) for name, (_, score, _) in zip(names, pieces)], unk_id=unk, byte_fallback=byte_fallback
        )
    tokenizer = tokenizers.Tokenizer(model)
    if model_type == UNIGRAM and not any("<" in name and len(name) > 1 for name in learned):
        tokenizer.pre_tokenizer = pre_tokenizers.Split("<", "isolated")
    if not byte_fallback:
        tokenizer.normalizer = normalizers.Replace(SPACE, " ")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(names[unk], " \u2047 "), decoders.ByteFallback(), decoders.Fuse()]
    )  # unk: " ⁇ "
    tokenizer.add_special_tokens(
        [
            AddedToken(n, special=True, normalized=False)
            for n, k in zip(names, kinds)
            if k in (PIECE_UNKNOWN, PIECE_CONTROL)
        ]
    )
    tokenizer.add_tokens(
        [AddedToken(n, special=False, normalized=False) for n, k in zip(names, kinds) if k == PIECE_USER_DEFINED]
    )
    return tokenizer.to_str().encode()


def _not_reproducible(trainer: dict[int, Any], normalizer: dict[int, Any]) -> str | None:
    """What in a model's TrainerSpec and NormalizerSpec (by field number) tokenizer.json would not reproduce."""
    checks = (
        (trainer.get(3, UNIGRAM) in (UNIGRAM, BPE), "it is neither BPE nor unigram"),
        (not normalizer.get(2) and not normalizer.get(6), "it normalizes text"),
        (normalizer.get(3, 1) == 0, "it adds a dummy prefix"),
        (normalizer.get(4, 1) == 0, "it removes extra whitespace"),
        (normalizer.get(5, 1) == 1, "it does not mark spaces as ▁"),
        (trainer.get(24, 0) == 0, "it puts the ▁ of a space at the end of pieces"),
    )
    return "; ".join(why for ok, why in checks if not ok) or None


def _read_model_proto(data: bytes) -> tuple[list[tuple[str, float, int]], dict[int, Any], dict[int, Any]]:
    """A serialized ModelProto read without protobuf (field numbers from sentencepiece_model.proto): its pieces
    as (piece, score, type), and its TrainerSpec and NormalizerSpec fields by number."""
    pieces, trainer, normalizer = [], {}, {}
    for number, value in _proto_fields(data):
        if number == 1:  # SentencePiece: piece = 1, score = 2 (a float), type = 3
            fields = dict(_proto_fields(value))
            score = struct.unpack("<f", fields[2])[0] if 2 in fields else 0.0
            pieces.append((fields.get(1, b"").decode("utf-8"), score, fields.get(3, PIECE_NORMAL)))
        elif number == 2:
            trainer.update(_proto_fields(value))
        elif number == 3:
            normalizer.update(_proto_fields(value))
    return pieces, trainer, normalizer


def _proto_fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: varints as int, the other fields as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        if key & 7 == 0:
            value, pos = _varint(data, pos)
        else:
            size, pos = _varint(data, pos) if key & 7 == 2 else ({1: 8, 5: 4}[key & 7], pos)
            value, pos = data[pos : pos + size], pos + size
        yield key >> 3, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


@hookimpl
def aic_register_tokenizers(register):
    register(SentencePiece)
