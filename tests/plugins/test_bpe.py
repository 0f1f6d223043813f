"""The bpe tokenizer plugin against independent references: `tokenizers`' own ByteLevelBPETokenizer trained on the
same file, GPT-4's digit groups, exact round trips of adversarial text, and a run that trains with it."""

from __future__ import annotations

import pickle

import pytest

from aic_core.cli import main
from aic_core.errors import DataError
from aic_core.testing import TokenizerContract
from aic_plugins.tokenizers.bpe import BPE, EOS
from tests.conftest import tiny_spec, write_spec

tokenizers = pytest.importorskip("tokenizers")

ADVERSARIAL = [
    "Anne Elliot\r\nCaptain Wentworth",
    "emoji 😀👍🏽 and a flag 🇬🇧",
    "中文字符，日本語のテキスト、한국어",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352",
    "runs of   spaces\t\ttabs\n\n\nand newlines",
    "digits 1234567890 3.14159 -42",
    "<|endoftext|> typed as text",
    "",
    " leading and trailing ",
]


class TestBPEContract(TokenizerContract):
    plugin = BPE
    options = {"vocab_size": 400, "special_tokens": ["<|user|>", "<|end|>"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok = BPE().train(BPE.Options(vocab_size=600), [corpus], path)
    return tok, path


def test_ids_equal_tokenizers_own_byte_level_bpe_trained_on_the_same_file(trained, corpus):
    ours, _ = trained
    ref = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    ref.train([str(corpus)], vocab_size=600, min_frequency=2, special_tokens=[EOS], show_progress=False)
    assert ours.vocab_size == ref.get_vocab_size()
    for paragraph in corpus.read_text(encoding="utf-8").split("\n\n")[:200]:
        assert ours.encode(paragraph) == ref.encode(paragraph).ids, paragraph[:60]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_any_text_round_trips_exactly(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_ids_cut_inside_a_character_decode_to_the_replacement_character(trained):
    tok, _ = trained
    ids = tok.encode("😀")  # four bytes, not merged in an English corpus
    assert len(ids) > 1
    assert "\ufffd" in tok.decode(ids[:1])


def test_the_eos_is_id_0_and_encode_adds_none(trained):
    tok, _ = trained
    assert tok.eos_id == 0 and tok.bos_id is None
    assert 0 not in tok.encode("Anne Elliot")


def test_gpt4_pre_tokenizer_splits_digits_in_groups_of_three(tmp_path, corpus):
    BPE().train(BPE.Options(vocab_size=400, pre_tokenizer="gpt4"), [corpus], tmp_path / "t.json")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "t.json"))
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("1234567 apples")]
    assert pieces[:3] == ["123", "456", "7"]


def test_it_pickles_for_the_encoding_workers(trained):
    tok, _ = trained
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("Captain Wentworth") == tok.encode("Captain Wentworth") and again.eos_id == tok.eos_id


def test_a_tokenizer_json_made_elsewhere_loads(tmp_path, corpus):
    ref = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    ref.train([str(corpus)], vocab_size=500, special_tokens=["</s>"], show_progress=False)
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = BPE().load(BPE.Options(), tmp_path / "tokenizer.json")
    assert tok.eos_id == ref.token_to_id("</s>") and tok.encode("Anne") == ref.encode("Anne").ids


def test_a_file_tokenizers_cannot_read_is_a_data_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer.json"):
        BPE().load(BPE.Options(), bad)
    with pytest.raises(DataError, match="not found"):
        BPE().load(BPE.Options(), tmp_path / "missing.json")


def test_a_run_trains_and_generates_with_bpe(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", tokenizer={"type": "bpe", "vocab_size": 400})
    spec["train"]["steps"] = 2
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    assert (tmp_path / "run" / "samples.txt").read_text().count("=== sample") == 2
