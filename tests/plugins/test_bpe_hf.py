"""The bpe plugin with Hugging Face folders and special tokens, against independent references: a GPT-2-format folder
built here (a byte-level BPE trained by `tokenizers`, saved as vocab.json + merges.txt, and a random GPT2LMHeadModel)
imports into aic, whose ids equal transformers.AutoTokenizer's and whose greedy generation equals transformers'; the
HF export of a bpe run loads in AutoTokenizer with aic's ids and text on every paragraph of the six Austen novels
(../shared/data/austen, skipped without it) and on adversarial strings; the bad inputs of issue 25."""

from __future__ import annotations

import json
import re

import pytest
import torch

from aic_core.cli import main
from aic_core.errors import SpecError
from aic_core.model.loading import hf_tokenizer, load_checkpoint_model
from aic_core.plugins.registry import get_registry
from aic_plugins.tokenizers.bpe import BPE, EOS
from tests.conftest import EXAMPLE_CORPUS, REPO, tiny_spec, write_spec

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

AUSTEN = REPO.parent / "shared" / "data" / "austen"
SPECIALS = ["<|user|>", "<|assistant|>", "<|end|>"]
ADVERSARIAL = [
    "emoji 😀👍🏽 and a flag 🇬🇧, ZWJ 👩‍👩‍👧",
    "中文字符，日本語のテキスト、한국어",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352",
    "CRLF\r\nline\r\n\r\nand \r alone",
    "runs of   spaces\t\ttabs\n\n\nand      newlines   ",
    "digits 1234567890 3.14159 -42 1,000,000",
    f"typed specials: {EOS} {' '.join(SPECIALS)} <|end <|user|",
    "",
    " ",
    "\u2581 a literal lower block",
]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"(?<=\n\n)", text) if p.strip()]


def greedy_transformers(folder, prompt_ids: list[int], new: int, eos: int | None) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, corpus):
    """A GPT-2-format HF folder: vocab.json + merges.txt of a byte-level BPE trained by `tokenizers` (no
    tokenizer.json), a tokenizer_config.json as GPT-2's, and a random GPT2LMHeadModel of its vocabulary."""
    folder = tmp_path_factory.mktemp("gpt2-hf")
    ref = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    ref.train([str(corpus)], vocab_size=700, min_frequency=2, special_tokens=[EOS], show_progress=False)
    ref.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 64, "bos_token": EOS, "eos_token": EOS, "unk_token": EOS})
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=ref.get_vocab_size(), n_positions=64, n_embd=48, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # weights larger than the init's: greedy choices that are not near-ties
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(str(folder))
    assert not (folder / "tokenizer.json").exists() and (folder / "merges.txt").is_file()
    return folder


def test_a_gpt2_format_folder_imports_with_its_own_tokenizer(gpt2_folder, tmp_path, capsys):
    hf = transformers.AutoTokenizer.from_pretrained(str(gpt2_folder))
    assert main(["import", "hf", str(gpt2_folder), str(tmp_path / "imported")]) == 0
    assert "vocab.json" in capsys.readouterr().out
    loaded = load_checkpoint_model(tmp_path / "imported")
    tok = loaded.tokenizer
    assert loaded.spec.tokenizer.type == "bpe" and tok.eos_id == hf.eos_token_id == 0
    state = json.loads((tmp_path / "imported" / "state.json").read_text())
    assert state["tokens"]["eos_id"] == 0 and state["tokens"]["special_ids"] == {EOS: 0}
    texts = paragraphs(EXAMPLE_CORPUS.read_text(encoding="utf-8"))[:400] + ADVERSARIAL
    for text in texts:
        ids = hf(text, split_special_tokens=True)["input_ids"]
        assert tok.encode(text) == ids, text[:60]
        assert tok.decode(ids) == hf.decode(ids) == text
        assert tok.encode_with_special(text) == hf(text)["input_ids"], text[:60]


@pytest.mark.parametrize("source", ["folder", "imported"])
def test_greedy_generation_equals_transformers(gpt2_folder, tmp_path, capsys, monkeypatch, source):
    path = gpt2_folder
    if source == "imported":
        assert main(["import", "hf", str(gpt2_folder), str(tmp_path / "imported")]) == 0
        path = tmp_path / "imported"
    hf = transformers.AutoTokenizer.from_pretrained(str(gpt2_folder))
    prompt = "Anne Elliot was"
    expected = greedy_transformers(gpt2_folder, hf(prompt)["input_ids"], 20, eos=0)
    capsys.readouterr()
    args = ["generate", str(path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20"]
    from aic_core.generate import decode

    pushed: list[int] = []  # the ids aic's generation streams, token by token
    push = decode._TextStream.push
    monkeypatch.setattr(
        decode._TextStream, "push", lambda self, token, last: pushed.append(token) or push(self, token, last)
    )
    assert main([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert pushed == expected[: len(pushed)] and (len(pushed) == 20 or pushed[-1] == 0)
    assert hf.decode([i for i in expected if i != 0]) in out


def test_a_gpt2_format_folder_fine_tunes_and_exports_back(gpt2_folder, tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "ft", model={"init_from": str(gpt2_folder)}, train={"steps": 2})
    del spec["tokenizer"]
    spec["model"] = {"init_from": str(gpt2_folder)}
    spec["train"]["seq_len"] = 32
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 0
    assert main(["export", str(tmp_path / "ft"), "--format", "hf", str(tmp_path / "ft-hf")]) == 0
    files = {p.name for p in (tmp_path / "ft-hf").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= files
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ft-hf"))
    ref = transformers.AutoTokenizer.from_pretrained(str(gpt2_folder))
    for text in ADVERSARIAL + paragraphs(EXAMPLE_CORPUS.read_text(encoding="utf-8"))[:50]:
        assert hf(text)["input_ids"] == ref(text)["input_ids"]
    assert json.loads((tmp_path / "ft-hf" / "config.json").read_text())["eos_token_id"] == 0


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    """A bpe run with special tokens trained on the shipped novel, and its HF export."""
    root = tmp_path_factory.mktemp("bpe-export")
    spec = tiny_spec(EXAMPLE_CORPUS, root / "run", train={"steps": 1, "warmup_steps": 0}, generate={"prompts": []})
    spec["tokenizer"] = {"type": "bpe", "vocab_size": 1200, "pre_tokenizer": "gpt4", "special_tokens": SPECIALS}
    spec["tokenizer"]["pad_token"] = "<|pad|>"
    assert main(["run", str(write_spec(root / "s.json", spec))]) == 0
    assert main(["export", str(root / "run"), "--format", "hf", str(root / "hf")]) == 0
    return root / "run", root / "hf"


def test_special_tokens_have_ids_that_text_never_produces(bpe_export):
    tok = load_checkpoint_model(bpe_export[0]).tokenizer
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, None)
    assert tok.special_ids == {EOS: 0, "<|pad|>": 1, "<|user|>": 2, "<|assistant|>": 3, "<|end|>": 4}
    for name, i in tok.special_ids.items():
        text = f"say {name} twice:{name}"
        assert i not in tok.encode(text) and tok.decode(tok.encode(text)) == text
        asked = tok.encode_with_special(text)
        assert asked.count(i) == 2 and tok.decode(asked) == text
    state = load_checkpoint_model(bpe_export[0]).checkpoint.state
    assert state["tokens"]["special_ids"]["<|end|>"] == 4 and state["tokens"]["pad_id"] == 1


def test_the_export_carries_the_roles_and_special_tokens(bpe_export):
    _, folder = bpe_export
    config = json.loads((folder / "tokenizer_config.json").read_text())
    added = {v["content"]: (int(k), v["special"]) for k, v in config["added_tokens_decoder"].items()}
    assert added == {EOS: (0, True), "<|pad|>": (1, True), "<|user|>": (2, True), "<|assistant|>": (3, True),
                     "<|end|>": (4, True)}  # fmt: skip
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (0, 1, None)
    model_config = json.loads((folder / "config.json").read_text())
    assert (model_config["eos_token_id"], model_config["pad_token_id"]) == (0, 1)


def _check(tok, hf, texts):
    for text in texts:
        ids = tok.encode(text)
        assert hf(text, split_special_tokens=True)["input_ids"] == ids, text[:60]
        assert hf.decode(ids) == tok.decode(ids) == text
        asked = tok.encode_with_special(text)
        assert hf(text)["input_ids"] == asked and hf.decode(asked) == tok.decode(asked), text[:60]


def test_autotokenizer_on_the_export_gives_aic_ids_and_text(bpe_export):
    run, folder = bpe_export
    tok = load_checkpoint_model(run).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    _check(tok, hf, paragraphs(EXAMPLE_CORPUS.read_text(encoding="utf-8")) + ADVERSARIAL)


@pytest.mark.skipif(not AUSTEN.is_dir(), reason="needs ../shared/data/austen beside the checkout")
def test_autotokenizer_on_every_paragraph_of_the_six_novels(bpe_export):
    """Uses ../shared/data/austen/*.txt (skipped without it)."""
    run, folder = bpe_export
    tok = load_checkpoint_model(run).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = [p for f in sorted(AUSTEN.glob("*.txt")) for p in paragraphs(f.read_text(encoding="utf-8"))]
    assert len(texts) > 5000
    batch = hf(texts, split_special_tokens=True)["input_ids"]
    for text, theirs in zip(texts, batch):
        assert tok.encode(text) == theirs, text[:60]
        assert tok.decode(theirs) == text


@pytest.mark.parametrize(
    "text",
    [
        "".join(chr(c) for c in range(0x20, 0x3000, 7)),
        "\U0001f600" * 5 + "\u0301" * 4 + "\r\n" * 3,
        "\x00\x01\x7f binary-ish \ufeff BOM \u200b ZWSP",
        "\U0010ffff \ud7ff \ue000",
    ],
)
def test_decode_encode_is_the_identity_on_arbitrary_unicode(bpe_export, text):
    tok = load_checkpoint_model(bpe_export[0]).tokenizer
    assert tok.decode(tok.encode(text)) == text


# --- bad input ------------------------------------------------------------------------------------------------


def _run(tmp_path, capsys, **tokenizer):
    spec = tiny_spec(EXAMPLE_CORPUS, tmp_path / "run", tokenizer={"type": "bpe", **tokenizer})
    code = main(["run", str(write_spec(tmp_path / "bad.json", spec))])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("tokenizer", "says"),
    [
        ({"vocab_size": 258, "special_tokens": ["<a>", "<b>"]}, "tokenizer.vocab_size: 258 is too small"),
        ({"special_tokens": [""]}, "special token cannot be the empty string"),
        ({"special_tokens": ["<a>", "<a>"]}, "special token '<a>' is listed twice"),
        ({"special_tokens": [EOS]}, "is already tokenizer.eos_token"),
    ],
)
def test_bad_tokenizer_options_are_refused_before_any_work(tmp_path, capsys, tokenizer, says):
    code, err = _run(tmp_path, capsys, **tokenizer)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_plugin_check_names_the_minimum(tmp_path):
    with pytest.raises(SpecError, match=r"take 259 ids"):
        BPE().check(BPE.Options(vocab_size=258, pad_token="<p>", special_tokens=["<a>"]), None)


def test_a_folder_whose_tokenizer_json_tokenizers_cannot_read_is_refused(gpt2_folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in gpt2_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    capsys.readouterr()
    assert main(["import", "hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a tokenizer.json that Hugging Face tokenizers" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_model_is_refused(gpt2_folder, tmp_path, capsys, corpus):
    big = tmp_path / "big"
    big.mkdir()
    for f in gpt2_folder.iterdir():
        if f.name not in ("vocab.json", "merges.txt"):
            (big / f.name).write_bytes(f.read_bytes())
    ref = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    ref.train([str(corpus)], vocab_size=900, special_tokens=[EOS], show_progress=False)
    ref.save(str(big / "tokenizer.json"))
    capsys.readouterr()
    assert main(["import", "hf", str(big), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "more than the model's vocabulary" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_folder_with_tokenizer_files_of_two_kinds_is_refused(gpt2_folder, tmp_path, capsys, corpus):
    from aic_plugins.tokenizers.sentencepiece import SentencePiece

    two = tmp_path / "two"
    two.mkdir()
    for f in gpt2_folder.iterdir():
        (two / f.name).write_bytes(f.read_bytes())
    plugin = SentencePiece()
    plugin.train(plugin.Options(vocab_size=500), [corpus], two / "tokenizer.model")
    capsys.readouterr()
    assert main(["import", "hf", str(two), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer files of two kinds" in err and "tokenizer.model" in err and "vocab.json" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_folder_with_two_files_of_one_tokenizer_takes_the_original(tmp_path, corpus):
    """aic's sentencepiece export carries tokenizer.model and the tokenizer.json made of it: the same tokenizer, read
    by the sentencepiece plugin."""
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 1, "warmup_steps": 0}, generate={"prompts": []})
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    assert main(["export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert {"tokenizer.model", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    found = hf_tokenizer(tmp_path / "hf", get_registry())
    assert found.plugin.name == "sentencepiece" and found.files == ["tokenizer.model"]


# --- a Llama/Mistral-style tokenizer.json (SentencePiece-style BPE: ▁ for spaces, byte fallback) ------------


def llama_style_tokenizer(corpus):
    """A tokenizer.json laid out as Llama 2's and Mistral's: <unk> <s> </s>, the 256 byte pieces, then BPE merges on
    text whose spaces are ▁ with one prepended, byte fallback, and a post-processor that adds <s>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE())
    base.normalizer = normalizer
    base.train([str(corpus)], trainers.BpeTrainer(vocab_size=600, show_progress=False))
    learned = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("llama-hf")
    tok = llama_style_tokenizer(corpus)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(str(folder))
    return folder


def test_a_llama_style_tokenizer_json_gives_transformers_ids(llama_folder, tmp_path):
    hf = transformers.AutoTokenizer.from_pretrained(str(llama_folder))
    assert main(["import", "hf", str(llama_folder), str(tmp_path / "imported")]) == 0
    tok = load_checkpoint_model(tmp_path / "imported").tokenizer
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert tok.special_ids == {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in paragraphs(EXAMPLE_CORPUS.read_text(encoding="utf-8"))[:300] + ADVERSARIAL:
        ids = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.encode(text) == ids, text[:60]
        assert tok.decode(ids) == hf.decode(ids)
    assert hf("Anne")["input_ids"][0] == 1 and tok.encode("Anne")[0] != 1  # aic's encode adds no bos


def test_a_llama_style_folder_generates_transformers_greedy_ids(llama_folder, capsys, monkeypatch):
    from aic_core.generate import decode

    hf = transformers.AutoTokenizer.from_pretrained(str(llama_folder))
    prompt = "Captain Wentworth"
    prompt_ids = hf(prompt, add_special_tokens=False)["input_ids"]
    expected = greedy_transformers(llama_folder, prompt_ids, 16, eos=2)
    pushed: list[int] = []
    push = decode._TextStream.push
    monkeypatch.setattr(decode._TextStream, "push", lambda self, t, last: pushed.append(t) or push(self, t, last))
    args = ["generate", str(llama_folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16"]
    assert main([*args, "--device", "cpu"]) == 0
    assert pushed == expected[: len(pushed)] and (len(pushed) == 16 or pushed[-1] == 2)
