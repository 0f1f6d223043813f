"""The sentencepiece tokenizer plugin.

Specification:
  * the file it writes is a plain SentencePiece model: `sentencepiece.SentencePieceProcessor` loaded on
    it (the reference) gives the same ids (no bos/eos) and the same text as the plugin;
  * decode(encode(text)) == text exactly: newlines, blank lines, runs of spaces, tabs, non-ASCII;
  * the vocabulary has exactly `vocab_size` pieces, unk=0 bos=1 eos=2, special tokens are one piece each;
  * every bad input is one clear AicError naming what to fix, and a failed training never touches
    the file already at `path`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sentencepiece as spm
from pydantic import ValidationError

from aic_core.errors import DataError, SpecError
from aic_plugins.tokenizers.sentencepiece import EXACT_TEXT, SentencePiece

REPO = Path(__file__).resolve().parents[2]
NOVEL = REPO / "examples" / "data" / "persuasion.txt"
SHARED_NOVEL = REPO.parent / "shared" / "data" / "austen" / "persuasion.txt"

PLUGIN = SentencePiece()
VOCAB = 600

# Text the tokenizer must give back exactly.
SAMPLES = [
    "Anne Elliot walked to Uppercross.",
    "Line one.\nLine two.\n\nA new paragraph after a blank line.\n",
    "Two  spaces,   three spaces, and a trailing space ",
    "  indented\n\tand tabbed\t\tline\n",
    "Café, naïve, rôle — and “curly quotes” … done.",
    "\n\n\nleading newlines",
    "Captain Wentworth was",
    "",
]


def options(**overrides) -> SentencePiece.Options:
    return SentencePiece.Options(**{"vocab_size": VOCAB, **overrides})


def reference(path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first ~100 KB of an Austen novel (the repo's example, else the shared copy), cut at a line end."""
    source = NOVEL if NOVEL.is_file() else SHARED_NOVEL
    if not source.is_file():
        pytest.skip(f"no example corpus at {NOVEL} or {SHARED_NOVEL}")
    text = source.read_text(encoding="utf-8")[:100_000]
    path = tmp_path_factory.mktemp("corpus") / "novel.txt"
    path.write_text(text[: text.rindex("\n") + 1], encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, corpus, tmp_path_factory):
    """(options, tokenizer, model path) for each model type, trained once per module."""
    opts = options(model_type=request.param)
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.model"
    return opts, PLUGIN.train(opts, [corpus], path), path


# --- the same as SentencePiece itself --------------------------------------------------------


def test_writes_one_file_that_sentencepiece_loads(trained):
    opts, tok, path = trained
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .vocab, no temp folder left
    ref = reference(path)
    assert ref.get_piece_size() == opts.vocab_size == tok.vocab_size


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_and_decode_match_the_reference(trained, text):
    _, tok, path = trained
    ref = reference(path)
    ids = tok.encode(text)
    assert ids == ref.encode(text)  # the reference adds no bos/eos by default either
    assert tok.decode(ids) == ref.decode(ids)


def test_loaded_tokenizer_equals_trained_one(trained, corpus):
    opts, tok, path = trained
    loaded = PLUGIN.load(opts, path)
    text = corpus.read_text(encoding="utf-8")[:5000]
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)


# --- exact round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(trained, text):
    _, tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_of_the_whole_corpus_and_of_chunks(trained, corpus):
    """The data pipeline encodes a file in chunks of whole lines and concatenates the ids."""
    _, tok, _ = trained
    text = corpus.read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text)) == text
    lines = text.splitlines(keepends=True)
    a, b = "".join(lines[:100]), "".join(lines[100:200])
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_round_trip_of_text_outside_the_corpus(trained):
    """Byte fallback covers characters the corpus never had, and the literal '▁' SentencePiece uses for spaces."""
    _, tok, _ = trained
    for text in ["日本語のテキスト 😀\r\n", "x\u2581y \u2581\u2581 z", "\u00a0non-breaking\u2009thin"]:
        assert tok.decode(tok.encode(text)) == text


def test_newlines_and_spaces_are_pieces_not_dropped(trained):
    _, tok, path = trained
    ref = reference(path)
    assert ref.piece_to_id("\n") != ref.unk_id()
    assert len(tok.encode("a\n\nb")) > len(tok.encode("a b"))  # the newlines cost tokens: they are kept
    assert ref.unk_id() not in tok.encode("Two  spaces\n\tand a tab")


def test_without_byte_fallback_only_the_corpus_characters_round_trip(corpus, tmp_path):
    path = tmp_path / "t.model"
    tok = PLUGIN.train(options(byte_fallback=False, vocab_size=300), [corpus], path)
    text = 'Anne said,  "Yes."\n\n    She  walked on.\n'
    assert tok.decode(tok.encode(text)) == text
    ref = reference(path)
    unseen = "a\tb 日"  # neither a tab nor CJK is in the novel: they become unk, as in SentencePiece
    assert tok.encode(unseen) == ref.encode(unseen) and tok.encode(unseen).count(ref.unk_id()) == 2


# --- ids ---------------------------------------------------------------------------------------


def test_reserved_ids_and_no_bos_eos_in_encode(trained):
    _, tok, path = trained
    ref = reference(path)
    assert (ref.unk_id(), ref.bos_id(), ref.eos_id()) == (0, 1, 2)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("Anne")
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    # bos and eos decode as their text, as in transformers and tiktoken (SentencePiece drops them).
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "<s>Anne</s>"
    assert ref.decode([tok.bos_id, *ids, tok.eos_id]) == "Anne"


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 10, -1])
def test_decode_refuses_ids_out_of_range(trained, bad):
    _, tok, _ = trained
    with pytest.raises(DataError, match=rf"token id {bad} .*out of range"):
        tok.decode([5, bad, 7])


def test_special_tokens_have_one_id_that_text_never_produces(corpus, tmp_path):
    specials = ["<|sep|>", "<|user|>", "[MASK]"]
    opts = options(special_tokens=specials)
    path = tmp_path / "t.model"
    tok = PLUGIN.train(opts, [corpus], path)
    ref = reference(path)
    assert ref.get_piece_size() == VOCAB
    assert [ref.piece_to_id(t) for t in specials] == [3, 4, 5]  # after unk/bos/eos, in the listed order
    for token in specials:
        token_id = ref.piece_to_id(token)
        assert ref.is_control(token_id) and ref.id_to_piece(token_id) == token
        assert tok.special_ids[token] == token_id
        text = f"Anne{token}Elliot {token} walked"
        ids = tok.encode(text)  # typed in a document or a prompt: its characters, never the token
        assert token_id not in ids and ids == ref.encode(text)
        assert tok.decode(ids) == text
        asked = tok.encode_with_special(text)  # what a chat template's rendering asks for
        assert asked.count(token_id) == 2
        assert asked == tok.encode("Anne") + [token_id] + tok.encode("Elliot ") + [token_id] + tok.encode(" walked")
        assert tok.decode(asked) == text
        assert tok.encode_with_special(text, allowed_special=[]) == ids
    assert tok.special_ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|sep|>": 3, "<|user|>": 4, "[MASK]": 5}
    only = tok.encode_with_special("<|sep|><|user|>", allowed_special=["<|user|>"])
    assert only == tok.encode("<|sep|>") + [4]
    with pytest.raises(SpecError, match=r"allowed_special: '<\|bot\|>' is not a special token"):
        tok.encode_with_special("x", allowed_special=["<|bot|>"])


def test_user_defined_symbols_of_older_tokenizers_still_encode_from_text(corpus, tmp_path):
    """Tokenizers trained before special tokens became control symbols hold them as user-defined symbols: they load
    and encode as they did (text produces them)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.read_text(encoding="utf-8").split("\n\n")),
        model_prefix=str(tmp_path / "old"),
        vocab_size=VOCAB,
        user_defined_symbols=["<|sep|>"],
        **{k: v for k, v in EXACT_TEXT.items() if k != "max_sentence_length"},
    )
    tok = PLUGIN.load(options(), tmp_path / "old.model")
    assert tok.encode("a<|sep|>b") == reference(tmp_path / "old.model").encode("a<|sep|>b")
    assert 3 in tok.encode("a<|sep|>b") and "<|sep|>" not in tok.special_ids


def test_training_uses_one_thread_unless_asked(corpus, tmp_path, monkeypatch):
    """SentencePiece's output depends on its thread count (bench/RESULTS.md, "Tokenizers"): one spec must give one
    tokenizer on any machine, so the default is one thread, whatever the CPUs."""
    seen = []
    train = spm.SentencePieceTrainer.train
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda **kw: seen.append(kw["num_threads"]) or train(**kw))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    PLUGIN.train(options(), [corpus], tmp_path / "a.model")
    PLUGIN.train(options(num_threads=2), [corpus], tmp_path / "b.model")
    assert seen == [1, 2]


def test_training_is_deterministic(corpus, tmp_path):
    PLUGIN.train(options(), [corpus], tmp_path / "a.model")
    PLUGIN.train(options(), [corpus], tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


# --- atomic writes -----------------------------------------------------------------------------


def test_failed_training_leaves_the_existing_file_untouched(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Anne walked to the village and back again.\n" * 20)
    path = tmp_path / "out" / "tokenizer.model"
    path.parent.mkdir()
    path.write_bytes(b"the previous tokenizer")
    with pytest.raises(SpecError):
        PLUGIN.train(options(vocab_size=5000), [small], path)
    assert path.read_bytes() == b"the previous tokenizer"
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.model"]  # no temp folder left behind


def test_successful_training_replaces_the_existing_file(corpus, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"stale")
    tok = PLUGIN.train(options(vocab_size=400), [corpus], path)
    assert reference(path).get_piece_size() == 400 == tok.vocab_size
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# --- bad input -----------------------------------------------------------------------------------


def test_missing_training_file(corpus, tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt.*not found"):
        PLUGIN.train(options(), [corpus, tmp_path / "missing.txt"], tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_empty_training_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\n\t\n")
    with pytest.raises(DataError, match="empty"):
        PLUGIN.train(options(), [tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_training_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\u00e9 au lait.\n".encode("latin-1") * 50)
    with pytest.raises(DataError, match=r"latin1\.txt.*UTF-8"):
        PLUGIN.train(options(), [bad], tmp_path / "t.model")


def test_vocab_size_the_corpus_cannot_support(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Anne walked to the village and back again.\nThe sea was calm at Lyme.\n" * 20)
    with pytest.raises(SpecError) as err:
        PLUGIN.train(options(vocab_size=5000), [small], tmp_path / "t.model")
    message = str(err.value)
    assert "tokenizer.vocab_size" in message and "5000" in message and "Lower" in message
    largest = int(re.search(r"at most (\d+)", message).group(1))
    # The largest size it names is one SentencePiece can in fact train on this corpus.
    tok = PLUGIN.train(options(vocab_size=largest), [small], tmp_path / "t.model")
    assert reference(tmp_path / "t.model").get_piece_size() == largest == tok.vocab_size


@pytest.mark.parametrize(
    ("overrides", "minimum"),
    [
        ({"vocab_size": 100}, 3 + 256 + 1),
        ({"vocab_size": 261, "special_tokens": ["<a>", "<b>"]}, 3 + 2 + 256 + 1),
        ({"vocab_size": 3, "byte_fallback": False}, 3 + 1),
    ],
)
def test_vocab_size_too_small_for_reserved_pieces(tmp_path, corpus, overrides, minimum):
    opts = options(**overrides)
    with pytest.raises(SpecError, match=rf"tokenizer\.vocab_size: {opts.vocab_size} .*at least {minimum}\b"):
        PLUGIN.check(opts, None)  # refused before any work ...
    with pytest.raises(SpecError, match=rf"at least {minimum}\b"):
        PLUGIN.train(opts, [corpus], tmp_path / "t.model")  # ... and by train itself
    PLUGIN.check(options(**{**overrides, "vocab_size": minimum}), None)


def test_vocab_size_too_small_for_the_corpus_characters(corpus, tmp_path):
    """Above the reserved minimum but below reserved + the corpus's distinct characters."""
    with pytest.raises(SpecError, match=r"tokenizer\.vocab_size: 265 .*at least (\d+)") as err:
        PLUGIN.train(options(vocab_size=265), [corpus], tmp_path / "t.model")
    needed = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert needed == 3 + 256 + len(set(corpus.read_text(encoding="utf-8")))


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.model.*not found"):
        PLUGIN.load(options(), tmp_path / "nothing.model")


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model", "truncated"])
def test_load_corrupt_file(trained, tmp_path, content):
    _, _, good = trained
    if content == "truncated":
        content = good.read_bytes()[:200]
    path = tmp_path / "broken.model"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.model.*not a valid SentencePiece model"):
        PLUGIN.load(options(), path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("model_type", "word"),
        ("character_coverage", 0),
        ("character_coverage", 1.5),
        ("input_sentence_size", -1),
        ("num_threads", 0),
        ("special_tokens", [""]),
        ("special_tokens", ["<a>", "<a>"]),
        ("special_tokens", ["two words"]),
        ("special_tokens", ["<s>"]),
        ("special_tokens", ["<0x41>"]),
        ("vocab_sise", 100),
    ],
)
def test_invalid_options(field, value):
    with pytest.raises(ValidationError) as err:
        SentencePiece.Options(**{field: value})
    assert err.value.errors()[0]["loc"][0] == field


def test_registered_under_its_entry_point():
    from aic_core.plugins.registry import get_registry

    plugin = get_registry().get("tokenizer", "sentencepiece")
    assert type(plugin).__name__ == "SentencePiece" and plugin.kind == "tokenizer"
