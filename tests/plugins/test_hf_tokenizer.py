"""An HF export's tokenizer files: transformers.AutoTokenizer gives aic's ids and text exactly (BPE and unigram,
use_fast True and False, without protobuf), checked against sentencepiece itself and the original text."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import sentencepiece as spm

from aic_core.cli import main
from aic_core.model.loading import load_checkpoint_model
from aic_plugins.tokenizers.sentencepiece import SentencePiece
from tests.conftest import EXAMPLE_CORPUS, REPO, tiny_spec, write_spec

transformers = pytest.importorskip("transformers")

AUSTEN = REPO.parent / "shared" / "data" / "austen"  # other novels, where this checkout has them beside it
EDGE_CASES = [
    "",
    " ",
    "\n",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d\t\te\t f",
    "line\nline\n\n\nthree blank\r\nCRLF\r\n",
    "\n\n  indented after blank lines",
    "é—… café, naïve “quotes” and ‘single’ ones",
    "日本語 🦙 Ωmega ß",
    "a literal ▁ and ▁▁ two, ▁leading and trailing▁",
    "▁",
    "<s> and </s> and <unk> in the text",
    "bytes <0x41> <0xE2> look-alikes",
    "a <|sep|> b<|sep|>c <|sep",
    "1234567890 3.14 ... !!! ???",
]


def _paragraphs(text: str, count: int) -> list[str]:
    """`count` paragraphs from the middle of a novel, each with the newlines that follow it."""
    chunks = [c for c in re.split(r"(?<=\n\n)", text) if c.strip()]
    middle = len(chunks) // 3
    return chunks[middle : middle + count]


def _variants(paragraphs: list[str]) -> list[str]:
    """The paragraphs as written, and with what the corpus lacks: typographic punctuation, accents, runs of spaces."""
    table = str.maketrans({'"': "“", "'": "’", "-": "—", "e": "é"})
    return paragraphs + [
        ("  " + p.translate(table)).replace(". ", ".   ").replace("\n", "\r\n") for p in paragraphs[::4]
    ]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """An HF export of a tiny run trained on the shipped novel, for a BPE and a unigram tokenizer."""
    root = tmp_path_factory.mktemp("hf-tokenizer")
    out = {}
    for model_type in ("bpe", "unigram"):
        spec = tiny_spec(EXAMPLE_CORPUS, root / model_type, train={"steps": 1}, generate={"prompts": []})
        spec["tokenizer"] = {
            "type": "sentencepiece",
            "vocab_size": 2000,
            "model_type": model_type,
            "special_tokens": ["<|sep|>"],
        }
        assert main(["run", str(write_spec(root / f"{model_type}.json", spec))]) == 0
        assert main(["export", str(root / model_type), "--format", "hf", str(root / f"{model_type}-hf")]) == 0
        out[model_type] = root / f"{model_type}-hf"
    return out


def _check(folder, texts, use_fast):
    aic = load_checkpoint_model(folder.parent / folder.name.removesuffix("-hf")).tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=use_fast)
    for text in texts:
        ids = hf(text, split_special_tokens=True)["input_ids"]  # special tokens' characters read as text
        assert ids == aic.encode(text), text
        if "▁" not in text:  # aic spells a literal "▁" as its bytes; everything else is sentencepiece's own encoding
            assert ids == sp.encode(text), text
        assert hf.decode(ids) == text, text
        asked = hf(text)["input_ids"]  # transformers' default matches them, as aic's encode_with_special does
        assert asked == aic.encode_with_special(text), text
        assert hf.decode(asked) == aic.decode(asked), text


@pytest.mark.parametrize("use_fast", [True, False])
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_autotokenizer_gives_aic_ids_and_text(exports, model_type, use_fast):
    folder = exports[model_type]
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    texts = _variants(_paragraphs(EXAMPLE_CORPUS.read_text(encoding="utf-8"), 240)) + EDGE_CASES
    assert len(texts) > 300
    _check(folder, texts, use_fast)


@pytest.mark.skipif(not AUSTEN.is_dir(), reason="needs ../shared/data/austen beside the checkout")
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_autotokenizer_on_novels_it_was_not_trained_on(exports, model_type):
    """Uses ../shared/data/austen/*.txt (skipped without it): 150 paragraphs of each other novel."""
    texts = [
        p
        for f in sorted(AUSTEN.glob("*.txt"))
        if f.name != EXAMPLE_CORPUS.name
        for p in _paragraphs(f.read_text(encoding="utf-8"), 150)
    ]
    _check(exports[model_type], _variants(texts), use_fast=True)


def test_tokenizer_config_is_llama_style_and_adds_nothing(exports):
    config = json.loads((exports["bpe"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["add_bos_token"], config["add_eos_token"], config["add_prefix_space"], config["legacy"]) == (
        False,
        False,
        False,
        False,
    )
    assert (config["unk_token"], config["bos_token"], config["eos_token"]) == ("<unk>", "<s>", "</s>")
    assert config["clean_up_tokenization_spaces"] is False and config["model_max_length"] == 32
    hf = transformers.AutoTokenizer.from_pretrained(str(exports["bpe"]))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf("Anne")["input_ids"] == hf("Anne", add_special_tokens=False)["input_ids"]  # no bos, no eos


BLOCK_PROTOBUF = """
import importlib.abc, json, sys
class NoProtobuf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "google.protobuf" or name.startswith("google.protobuf."):
            raise ImportError("protobuf is blocked for this test")
sys.meta_path.insert(0, NoProtobuf())
import transformers
folder, texts = sys.argv[1], json.loads(sys.argv[2])
got = {}
for fast in (True, False):
    tok = transformers.AutoTokenizer.from_pretrained(folder, use_fast=fast)
    ids = [tok(t, split_special_tokens=True)["input_ids"] for t in texts]
    got[str(fast)] = [[i, tok.decode(i)] for i in ids]
assert not any(m == "google.protobuf" or m.startswith("google.protobuf.") for m in sys.modules)
print(json.dumps(got))
"""


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_autotokenizer_needs_no_protobuf(exports, model_type):
    texts = EDGE_CASES + _paragraphs(EXAMPLE_CORPUS.read_text(encoding="utf-8"), 5)
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PROTOBUF, str(exports[model_type]), json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    aic = load_checkpoint_model(exports[model_type].parent / model_type).tokenizer
    expected = [[aic.encode(t), t] for t in texts]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"True": expected, "False": expected}


def test_without_byte_fallback_ids_still_match(tmp_path):
    """No byte pieces: unknown characters are <unk> (decoded " ⁇ ", as sentencepiece), "▁" reads as a space. Not
    checked: an unknown "<" beside another unknown character, one fused <unk> in sentencepiece's unigram, two here."""
    plugin = SentencePiece()
    for model_type in ("bpe", "unigram"):
        options = plugin.Options(vocab_size=500, model_type=model_type, byte_fallback=False)
        aic = plugin.train(options, [EXAMPLE_CORPUS], tmp_path / model_type / "tokenizer.model")
        for name, data in plugin.hf_tokenizer_files(options, aic.path, 64).items():
            (tmp_path / model_type / name).write_bytes(data)
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / model_type))
        for text in [t for t in EDGE_CASES if "<" not in t] + _paragraphs(
            EXAMPLE_CORPUS.read_text(encoding="utf-8"), 20
        ):
            ids = hf(text)["input_ids"]
            assert ids == aic.encode(text) == aic.processor.encode(text), (model_type, text)
            assert hf.decode(ids) == aic.decode(ids), (model_type, text)


def test_a_sentencepiece_model_aic_did_not_train_gets_no_tokenizer_json(tmp_path):
    """Default SentencePiece settings (NFKC, a dummy prefix, whitespace clean-up) are not reproduced: say so, write
    nothing."""
    spm.SentencePieceTrainer.train(
        input=str(EXAMPLE_CORPUS), model_prefix=str(tmp_path / "plain"), vocab_size=500, minloglevel=2
    )
    plugin = SentencePiece()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plugin.hf_tokenizer_files(plugin.Options(), tmp_path / "plain.model", 64) == {}
    message = str(caught[0].message)
    assert (
        "not trained by aic" in message
        and "normalizes text" in message
        and "dummy prefix" in message
        and "tokenizer.model alone" in message
    )


BLOCK_TOKENIZERS = """
import importlib.abc, sys
class NoTokenizers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("tokenizers is blocked for this test")
sys.meta_path.insert(0, NoTokenizers())
from aic_core.cli import main
sys.exit(main(["export", sys.argv[1], "--format", "hf", sys.argv[2]]))
"""


def test_without_the_tokenizers_package_the_rest_is_written_and_the_export_says_why(exports, tmp_path):
    run = exports["bpe"].parent / "bpe"
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TOKENIZERS, str(run), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    assert "note: the `tokenizers` package is not installed, so the export has no tokenizer.json" in result.stdout
    assert "pip install -U tokenizers" in result.stdout


def test_export_refuses_tokenizer_files_that_autotokenizer_reads_differently(exports, tmp_path, monkeypatch, capsys):
    """The export loads AutoTokenizer on what it wrote: a tokenizer.json that lowercases the text is refused, nothing
    is written."""
    from tokenizers import Tokenizer, normalizers

    made = SentencePiece.hf_tokenizer_files

    def adds_bos(self, options, path, model_max_length):
        files = made(self, options, path, model_max_length)
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
        tokenizer.normalizer = normalizers.Lowercase()
        return {**files, "tokenizer.json": tokenizer.to_str().encode()}

    monkeypatch.setattr(SentencePiece, "hf_tokenizer_files", adds_bos)
    capsys.readouterr()
    assert main(["export", str(exports["bpe"].parent / "bpe"), "--format", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert (
        "AutoTokenizer gives other ids or text than aic's tokenizer" in err
        and "was not written" in err
        and "Traceback" not in err
    )
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))
