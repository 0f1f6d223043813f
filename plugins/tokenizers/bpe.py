"""Byte-level BPE on Hugging Face `tokenizers` (the Rust library): GPT-2's kind of tokenizer, trained on the run's
corpus with every core, or read from a Hugging Face model folder (any `tokenizer.json` that `tokenizers` reads, or
GPT-2's `vocab.json` + `merges.txt`, with the folder's `tokenizer_config.json` for bos/eos/pad and added tokens).

Every byte is in the alphabet (GPT-2's byte-to-unicode map), so decode(encode(text)) == text for any text, with no
unknown token; ids cut inside a multi-byte character decode to U+FFFD. The pre-tokenizer splits text before the
merges: GPT-2's regex, a GPT-4-style regex (cl100k-like: digits in groups of 1-3, as tiktoken and nanochat do) or
none. Ids of a trained tokenizer: the eos (`<|endoftext|>`, between documents) is 0, then bos and pad where set,
then `special_tokens` in their order, then the 256 bytes, then the merges. `encode` adds no bos or eos.

Special tokens (the eos, bos, pad and `special_tokens`, and every special token of a loaded tokenizer.json) have one
id each that `encode` never produces from text: "<|endoftext|>" typed in a document is thirteen characters. The chat
template's rendering asks for them (`encode_with_special`). The tokenizer is one file, `tokenizers`' own
tokenizer.json, which is also what the HF export carries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from aic_core.errors import DataError, SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Tokenizer, TokenizerPlugin, check_special_tokens

EOS = "<|endoftext|>"
ALPHABET = 256  # byte-level: every byte is a token
# GPT-4's (cl100k) pattern, with digits split in groups of 1-3: contractions, words with one leading non-letter,
# numbers, punctuation runs with a leading space, newlines, other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# Tokens a tokenizer.json without a tokenizer_config.json may use for the end of a document, in this order.
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
INSTALL = 'the bpe tokenizer needs Hugging Face tokenizers: pip install "tokenizers>=0.19"'
HF_CONFIG = "tokenizer_config.json"
# transformers' classes whose vocab.json + merges.txt are GPT-2's byte-level BPE (no tokenizer.json needed).
GPT2_CLASSES = (None, "GPT2Tokenizer", "GPT2TokenizerFast")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise SpecError(f"tokenizer.type: {INSTALL}") from None
    return tokenizers


class BPETokenizer(Tokenizer):
    """A loaded `tokenizers.Tokenizer` and the roles of its tokens; pickles as its JSON (for the data stage's
    encoding workers)."""

    def __init__(self, tok: Any, path: Path | None = None, roles: dict[str, str | None] | None = None) -> None:
        self.tok, self.path = tok, path
        self._roles = dict(roles or {})
        self.training_sample: str | None = None
        tok.encode_special_tokens = True  # special tokens' characters in a text are text (not serialised)
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        self.special_ids = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        eos = self._roles.get("eos")
        if "eos" not in self._roles:  # a bare tokenizer.json: the first of the usual names it has
            eos = next((name for name in EOS_NAMES if name in vocab), None)
        self.eos_id, self.bos_id, self.pad_id = (
            vocab[name] if name is not None else None for name in (eos, self._roles.get("bos"), self._roles.get("pad"))
        )

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
        return {"json": self.tok.to_str(), "path": self.path, "roles": self._roles, "sample": self.training_sample}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(_tokenizers().Tokenizer.from_str(state["json"]), state["path"], state["roles"])
        self.training_sample = state["sample"]


class BPE(TokenizerPlugin):
    """Byte-level BPE (GPT-2's kind), trained with Hugging Face tokenizers, or any tokenizer.json; any text
    round-trips exactly."""

    name = "bpe"
    trains = True
    # An HF folder's tokenizer.json (the export writes the run's file under this name), or GPT-2's vocab.json (with
    # merges.txt). A folder that also holds another plugin's file (tokenizer.model) is read by both: see
    # aic_core.model.loading.hf_tokenizer.
    hf_files = ("tokenizer.json", "vocab.json")

    class Options(PluginOptions):
        """Byte-level BPE (Hugging Face tokenizers). A tokenizer taken from model.init_from or an HF folder keeps its
        own vocabulary and merges; these options then name the roles of its tokens."""

        vocab_size: int = Field(
            8192, ge=ALPHABET + 1, description="Tokens in all: the special tokens, the 256 bytes, the merges."
        )
        min_frequency: int = Field(2, ge=1, description="A pair is merged only if it occurs at least this often.")
        pre_tokenizer: Literal["gpt2", "gpt4", "none"] = Field(
            "gpt2",
            description="How text is split before the merges: GPT-2's regex, a GPT-4-style (cl100k) regex that "
            "splits digits in groups of 1-3, or none (merges may cross words and spaces).",
        )
        eos_token: str | None = Field(
            EOS, min_length=1, description="The end-of-text token, put between documents (id 0 when trained)."
        )
        bos_token: str | None = Field(
            None, min_length=1, description="A beginning-of-text token, if the model uses one (null: none)."
        )
        pad_token: str | None = Field(None, min_length=1, description="A padding token (null: none).")
        special_tokens: list[str] = Field(
            default_factory=list,
            description="Tokens with one id each that text never produces: e.g. '<|user|>', '<|end|>' for chat "
            "templates. A document or prompt that holds the same characters encodes them as text; a chat template's "
            "rendering asks for the tokens (Tokenizer.encode_with_special).",
        )
        num_threads: int | None = Field(
            None,
            gt=0,
            description="Training threads (RAYON_NUM_THREADS; default: every CPU). Fixed at the first parallel work "
            "of the process, so set before the tokenizer stage starts.",
        )

        @field_validator("special_tokens")
        @classmethod
        def _special_tokens(cls, tokens: list[str]) -> list[str]:
            return check_special_tokens(tokens)

    @staticmethod
    def specials(options: PluginOptions) -> list[str]:
        """The special tokens of a trained tokenizer, in id order: eos, bos, pad, then special_tokens."""
        roles = [t for t in (options.eos_token, options.bos_token, options.pad_token) if t is not None]
        return list(dict.fromkeys(roles)) + [t for t in options.special_tokens if t not in roles]

    def planned_special_tokens(self, options: PluginOptions) -> list[str]:
        return self.specials(options)

    def check(self, options: PluginOptions, spec: Any) -> None:
        roles = {"eos_token": options.eos_token, "bos_token": options.bos_token, "pad_token": options.pad_token}
        for token in options.special_tokens:
            role = next((name for name, value in roles.items() if value == token), None)
            if role is not None:
                raise SpecError(
                    f"tokenizer.special_tokens: {token!r} is already tokenizer.{role}; list it once (remove it from "
                    "special_tokens)."
                )
        minimum = ALPHABET + len(self.specials(options))
        if options.vocab_size < minimum and not (spec is not None and getattr(spec.model, "init_from", None)):
            raise SpecError(
                f"tokenizer.vocab_size: {options.vocab_size} is too small: the 256 bytes and the "
                f"{len(self.specials(options))} special tokens (eos, bos, pad, special_tokens) take {minimum} ids "
                f"before any merge. Raise tokenizer.vocab_size well above {minimum} (8192 is usual)."
            )

    # --- train / load -------------------------------------------------------------------------

    def train(self, options: PluginOptions, files: list[Path], path: Path) -> Tokenizer:
        self.check(options, None)
        if options.num_threads and "RAYON_NUM_THREADS" not in os.environ:
            os.environ["RAYON_NUM_THREADS"] = str(options.num_threads)
        tk = _tokenizers()
        files = [Path(f) for f in files]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f}: training file not found. Check the path under data.train.")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = _pre_tokenizer(tk, options.pre_tokenizer)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=options.vocab_size,
            min_frequency=options.min_frequency,
            special_tokens=[tk.AddedToken(t, special=True, normalized=False) for t in self.specials(options)],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        try:
            tok.train([str(f) for f in files], trainer)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for unreadable or non-UTF-8 files
            raise DataError(
                f"tokenizer: Hugging Face tokenizers could not train on {', '.join(map(str, files))}: "
                f"{str(exc)[:300]}. Check that the files are UTF-8 text."
            ) from None
        _write(Path(path), tok.to_str().encode())
        out = BPETokenizer(tok, Path(path), _roles(options))
        size = sum(f.stat().st_size for f in files)
        out.training_sample = f"tokenizers read all {size / 1e6:.1f} MB"
        return out

    def load(self, options: PluginOptions, path: Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{path}: tokenizer file not found. Run the tokenizer stage (`aic run SPEC --stage tokenizer`) "
                "or restore the file."
            )
        tok = _read(path, path.read_bytes())
        vocab = tok.get_vocab(with_added_tokens=True)
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        for field in ("eos_token", "bos_token", "pad_token"):
            name = getattr(options, field)
            if name is not None and name not in vocab and not (field == "eos_token" and name == EOS):
                raise DataError(
                    f"{path}: tokenizer.{field} is {name!r}, which this tokenizer does not hold. Set tokenizer.{field} "
                    "to one of its tokens (or null)."
                )
        missing = [t for t in options.special_tokens if t not in specials]
        if missing:
            raise DataError(
                f"{path}: tokenizer.special_tokens lists {missing[0]!r}, which is not a special token of this "
                "tokenizer file (a tokenizer taken from model.init_from or a folder is used as it is). Remove it "
                "from tokenizer.special_tokens, or train a new tokenizer that has it."
            )
        roles = _roles(options)
        if options.eos_token == EOS and EOS not in vocab:  # the default, on a tokenizer that calls it otherwise
            del roles["eos"]
        return BPETokenizer(tok, path, roles)

    # --- Hugging Face folders -------------------------------------------------------------------

    def from_hf_folder(self, folder: Path) -> tuple[dict[str, Any], bytes]:
        """tokenizer.json (or GPT-2's vocab.json + merges.txt) with tokenizer_config.json's added tokens, and the
        options that name its bos, eos and pad."""
        folder = Path(folder)
        config = _read_config(folder)
        tk = _tokenizers()
        if (folder / "tokenizer.json").is_file():
            tok = _read(folder / "tokenizer.json", (folder / "tokenizer.json").read_bytes())
        else:
            tok = _gpt2_files(tk, folder, config)
        added = config.get("added_tokens_decoder") or {}
        have = tok.get_added_tokens_decoder()
        extra = [
            tk.AddedToken(
                _content(v),
                special=bool(v.get("special", False)),
                normalized=bool(v.get("normalized", False)),
                lstrip=bool(v.get("lstrip", False)),
                rstrip=bool(v.get("rstrip", False)),
                single_word=bool(v.get("single_word", False)),
            )
            for k, v in sorted(added.items(), key=lambda kv: int(kv[0]))
            if isinstance(v, dict) and int(k) not in have
        ]
        if extra:
            tok.add_tokens(extra)
        roles = {role: _content(config.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
        vocab = tok.get_vocab(with_added_tokens=True)
        special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
        for name in roles.values():  # a role's token is special, as transformers makes it
            if name is not None and name in vocab and name not in special:
                tok.add_special_tokens([tk.AddedToken(name, special=True, normalized=False)])
        if roles["eos"] is None:
            roles["eos"] = next((name for name in EOS_NAMES if name in vocab), None)
        options = {f"{role}_token": name for role, name in roles.items()}
        return options, tok.to_str().encode()

    def hf_tokenizer_files(self, options: PluginOptions, path: Path, model_max_length: int) -> dict[str, bytes]:
        """tokenizer_config.json beside the tokenizer.json copy: PreTrainedTokenizerFast, the roles' tokens and every
        added token (`added_tokens_decoder`, with `special`), adding no bos or eos of its own."""
        tok = self.load(options, path)
        decoder = tok.tok.get_added_tokens_decoder()
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            **{
                f"{role}_token": tok.tok.id_to_token(i)
                for role, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id))
                if i is not None
            },
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(decoder.items())
            },
        }
        return {HF_CONFIG: (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()}


# --- helpers ----------------------------------------------------------------------------------


def _roles(options: PluginOptions) -> dict[str, str | None]:
    return {"eos": options.eos_token, "bos": options.bos_token, "pad": options.pad_token}


def _pre_tokenizer(tk: Any, kind: str) -> Any:
    byte_level = tk.pre_tokenizers.ByteLevel
    if kind == "gpt2":
        return byte_level(add_prefix_space=False, use_regex=True)
    if kind == "gpt4":
        split = tk.pre_tokenizers.Split(tk.Regex(GPT4_PATTERN), behavior="isolated")
        return tk.pre_tokenizers.Sequence([split, byte_level(add_prefix_space=False, use_regex=False)])
    return byte_level(add_prefix_space=False, use_regex=False)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path, data: bytes) -> Any:
    try:
        return _tokenizers().Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a file it cannot read
        raise DataError(
            f"{path}: not a tokenizer.json that Hugging Face tokenizers {_tokenizers().__version__} can read "
            f"({str(exc)[:200]}). Use the model's own tokenizer.json (a newer tokenizers may read it: pip install -U "
            "tokenizers), or the tokenizer the run was made with."
        ) from None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / HF_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}). Fix or remove the file.") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object. Fix or remove the file.")
    return config


def _content(value: Any) -> str | None:
    """A token in tokenizer_config.json: a string, or an AddedToken's dict with its "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _gpt2_files(tk: Any, folder: Path, config: dict[str, Any]) -> Any:
    """GPT-2's slow tokenizer files as the tokenizer transformers' GPT2TokenizerFast makes of them."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not merges.is_file():
        raise DataError(
            f"{folder}: holds vocab.json but no merges.txt; GPT-2's tokenizer needs both (or a tokenizer.json). "
            "Copy the model's merges.txt into the folder."
        )
    cls = config.get("tokenizer_class")
    if cls not in GPT2_CLASSES:
        raise DataError(
            f"{folder / HF_CONFIG}: tokenizer_class {cls!r} with vocab.json + merges.txt: aic reads those files as "
            "GPT-2's byte-level BPE only. Put the model's tokenizer.json in the folder (transformers writes it with "
            "`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`)."
        )
    try:
        model = tk.models.BPE.from_file(str(vocab), str(merges))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for files it cannot read
        raise DataError(
            f"{folder}: vocab.json + merges.txt are not GPT-2 BPE files tokenizers can read ({str(exc)[:200]}). "
            "Use the model's own files."
        ) from None
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = tk.decoders.ByteLevel()
    tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    return tok


@hookimpl
def aic_register_tokenizers(register):
    register(BPE)
