"""aic_core.data.tokens: data files checked with the spec field named, UTF-8 errors at the file's byte offset,
a damaged token cache rebuilt, and honest messages and warnings for a corpus too small to split.

Token ids are compared with SentencePiece itself (the tokenizer file loaded by `sentencepiece`): the ids
of a text file are the reference's encoding of the whole text, then the end-of-text id. (Formats, folders,
globs, workers and bad rows: test_data_formats.py.)"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm

import aic_core.data.inputs as inputs_mod
import aic_core.data.tokens as data_mod
from aic_core.cli import _format_warning, main
from aic_core.data.tokens import check_data_files, encode_files, load_splits, utf8_error
from aic_core.errors import DataError
from aic_plugins.tokenizers.sentencepiece import SentencePiece, _CorpusReader
from tests.conftest import tiny_spec, write_spec

SEQ_LEN = 32  # tiny_spec's block_size


def fails(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "aic: error: " in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus):
    """(plugin tokenizer, sentencepiece reference, its file's hash) trained once on the 60 KB corpus."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tok = SentencePiece().train(SentencePiece.Options(vocab_size=400), [corpus], path)
    return tok, spm.SentencePieceProcessor(model_file=str(path)), data_mod.file_sha256(path)


def reference_ids(ref: spm.SentencePieceProcessor, *files: Path) -> list[int]:
    ids: list[int] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "\u2581" not in text  # no special handling: a plain encode
        ids += ref.encode(text) + [ref.eos_id()]
    return ids


# --- data files: missing, folder, unreadable, empty ----------------------------------------------


def test_check_data_files_names_the_field_and_index(tmp_path, corpus):
    check_data_files(SimpleNamespace(train=[str(corpus)], val=[]))  # a good file passes
    missing = SimpleNamespace(train=[str(corpus), str(tmp_path / "missing.txt")], val=[])
    with pytest.raises(DataError, match=r"^data\.train\[1\]: file not found: .*missing\.txt"):
        check_data_files(missing)
    with pytest.raises(DataError, match=r"^data\.val\[0\]: file not found"):
        check_data_files(SimpleNamespace(train=[str(corpus)], val=[str(tmp_path / "nope" / "v.txt")]))


def test_a_folder_without_data_files_is_named_and_its_files_listed(tmp_path, corpus):
    folder = tmp_path / "novels"
    folder.mkdir()
    for name in ("image.png", "notes", ".hidden.txt"):
        (folder / name).write_text("text\n")
    with pytest.raises(DataError) as info:
        check_data_files(SimpleNamespace(train=[str(folder)], val=[]))
    msg = str(info.value)
    assert msg.startswith(f"data.train[0]: the folder {folder} holds no data files") and "not found" not in msg
    assert ".txt" in msg and ".jsonl" in msg and ".parquet" in msg  # what a folder gives
    assert f'"{folder / "image.png"}", "{folder / "notes"}"' in msg and ".hidden" not in msg
    assert f'"{folder}/*.png"' in msg  # a glob reads any suffix


@pytest.mark.parametrize("content", [b"", b" \n\t\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "e.txt").write_bytes(content)
    with pytest.raises(DataError, match=r"^data\.train\[0\]: .*e\.txt is empty"):
        check_data_files(SimpleNamespace(train=[str(tmp_path / "e.txt")], val=[]))


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("some text\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(inputs_mod, "open", denied, raising=False)  # root reads any file; refuse like a chmod 000 would
    with pytest.raises(
        DataError, match=r"^data\.train\[0\]: .*secret\.txt cannot be read \(Permission denied\).*permissions"
    ):
        check_data_files(SimpleNamespace(train=[str(path)], val=[]))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("some text\n")
    path.chmod(0)
    with pytest.raises(DataError, match=r"secret\.txt cannot be read"):
        check_data_files(SimpleNamespace(train=[str(path)], val=[]))


def test_run_names_a_folder_without_data_files(tmp_path, capsys, corpus):
    (tmp_path / "texts").mkdir()
    shutil.copy(corpus, tmp_path / "texts" / "novel.txt.bak")
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(tmp_path / "texts")]})
    err = fails(
        capsys,
        ["run", str(write_spec(tmp_path / "s.json", spec))],
        "data.train[0]",
        "holds no data files",
        "novel.txt.bak",
    )
    assert "not found" not in err


def test_validate_reports_a_missing_data_file(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(corpus)], "val": [str(tmp_path / "val.txt")]})
    fails(capsys, ["validate", str(write_spec(tmp_path / "s.json", spec))], "data.val[0]", "val.txt", "not found")


# --- UTF-8 errors at the file's byte offset ------------------------------------------------------


@pytest.fixture
def late_bad_byte(tmp_path) -> tuple[Path, int, int]:
    """1.5 MB of valid UTF-8 (with multi-byte characters, so characters != bytes), then 0xff: (path, offset, line)."""
    line = "Caf\u00e9 na\u00efve \u2014 Anne Elliot walked to Uppercross \u2026 and back.\n"
    good = (line * (1_500_000 // len(line.encode()) + 1)).encode("utf-8")
    path = tmp_path / "late.txt"
    path.write_bytes(good + b"then a bad byte \xff here\nmore text\n")
    offset = len(good) + len(b"then a bad byte ")
    assert offset > 1.5e6 and offset % (1 << 20) != len(b"then a bad byte ")
    return path, offset, good.count(b"\n") + 1


def test_utf8_error_gives_the_file_offset_and_line(late_bad_byte):
    path, offset, line = late_bad_byte
    assert utf8_error(path) == f"invalid start byte 0xff at byte {offset} (line {line})"
    assert utf8_error(path, block_size=7) == utf8_error(path)  # the same wherever the blocks are cut


def test_utf8_error_across_block_boundaries(tmp_path):
    """Incomplete and invalid sequences at every position relative to a block boundary, against bytes.decode."""
    path = tmp_path / "f.txt"
    for bad in (b"\xff", b"\xe2\x82", b"\xf0\x9f\x98", b"\x80"):
        for k in range(9):
            content = "\u00e9\n\u20ac".encode()[:k] + bad + "x\u00e9".encode()  # a cut character, then a bad one
            path.write_bytes(content)
            try:
                content.decode("utf-8")
                expected = None
            except UnicodeDecodeError as exc:
                line = content.count(b"\n", 0, exc.start) + 1
                expected = f"at byte {exc.start} (line {line})"
            for block_size in (1, 2, 3, 4, 1 << 20):
                got = utf8_error(path, block_size=block_size)
                assert (got is None) if expected is None else (expected in got), (content, block_size, got)
    path.write_text("valid \u00e9 text\n", encoding="utf-8")
    assert utf8_error(path, block_size=1) is None


def test_encoding_gives_the_file_offset(late_bad_byte, tokenizer, tmp_path):
    path, offset, line = late_bad_byte
    tok, _, tok_hash = tokenizer
    with pytest.raises(
        DataError,
        match=r"^data\.train\[0\]: .*late\.txt is not UTF-8 text: "
        rf"invalid start byte 0xff at byte {offset} \(line {line}\)",
    ):
        encode_files([str(path)], "data.train", tok, tok_hash, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing left behind


def test_tokenizer_training_gives_the_file_offset(late_bad_byte, tmp_path):
    path, offset, line = late_bad_byte
    with pytest.raises(
        DataError, match=rf"late\.txt: not UTF-8 text: invalid start byte 0xff at byte {offset} \(line {line}\)"
    ):
        SentencePiece().train(SentencePiece.Options(vocab_size=400), [path], tmp_path / "t.model")
    reader = _CorpusReader([path])  # the reader that feeds SentencePiece says the same
    for _ in reader:
        pass
    assert f"at byte {offset} (line {line})" in str(reader.error)


def test_run_gives_the_file_offset(late_bad_byte, tmp_path, capsys, corpus):
    path, offset, line = late_bad_byte
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(path)]})
    fails(capsys, ["run", str(write_spec(tmp_path / "s.json", spec))], "late.txt", f"at byte {offset} (line {line})")


# --- the token cache ------------------------------------------------------------------------------


def cache_files(cache: Path) -> tuple[Path, Path]:
    (bin_path,) = cache.glob("*.bin")
    return bin_path, bin_path.with_suffix(".json")


def test_encoded_ids_equal_sentencepiece(tokenizer, corpus, tmp_path):
    tok, ref, tok_hash = tokenizer
    data = encode_files([str(corpus)], "data.train", tok, tok_hash, tmp_path / "cache")
    assert data.ids.tolist() == reference_ids(ref, corpus)
    assert data.n_bytes == corpus.stat().st_size
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        p.name for p in cache_files(tmp_path / "cache")
    )  # no temporary files left


@pytest.mark.parametrize("damage", ["truncate", "empty", "longer"])
def test_damaged_cache_array_is_reported_and_rebuilt(tokenizer, corpus, tmp_path, damage):
    tok, ref, tok_hash = tokenizer
    cache = tmp_path / "cache"
    encode_files([str(corpus)], "data.train", tok, tok_hash, cache)
    bin_path, _ = cache_files(cache)
    size = bin_path.stat().st_size
    if damage == "longer":
        with open(bin_path, "ab") as f:
            f.write(b"\0\0")
    else:
        os.truncate(bin_path, size // 2 if damage == "truncate" else 0)
    with pytest.warns(
        UserWarning,
        match=rf"token cache: .*{bin_path.name} is .* bytes.*truncated or damaged.*encoding the corpus again",
    ):
        data = encode_files([str(corpus)], "data.train", tok, tok_hash, cache)
    assert data.ids.tolist() == reference_ids(ref, corpus)
    assert bin_path.stat().st_size == size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next read is silent
        assert encode_files([str(corpus)], "data.train", tok, tok_hash, cache).ids.tolist() == reference_ids(
            ref, corpus
        )


@pytest.mark.parametrize(
    "meta", ['{"dtype": "uint16", "n_tok', "", '{"dtype": "float32", "n_tokens": 5, "n_bytes": 9}', "[]"]
)
def test_cache_metadata_that_does_not_parse_is_reported_and_rebuilt(tokenizer, corpus, tmp_path, meta):
    tok, ref, tok_hash = tokenizer
    cache = tmp_path / "cache"
    encode_files([str(corpus)], "data.train", tok, tok_hash, cache)
    _, meta_path = cache_files(cache)
    meta_path.write_text(meta)
    with pytest.warns(UserWarning, match=rf"token cache: .*{meta_path.name} does not parse"):
        data = encode_files([str(corpus)], "data.train", tok, tok_hash, cache)
    assert data.ids.tolist() == reference_ids(ref, corpus)
    assert json.loads(meta_path.read_text())["n_tokens"] == len(data)


def test_a_cache_written_half_way_is_never_used(tokenizer, corpus, tmp_path, monkeypatch):
    """The array is renamed into place before its metadata: a writer stopped in between leaves an array
    without metadata, which is not a cache; the next encode writes it again."""
    tok, ref, tok_hash = tokenizer
    cache = tmp_path / "cache"
    real_replace = os.replace

    def crash_before_metadata(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # the process stops here
        real_replace(src, dst)

    monkeypatch.setattr(data_mod.os, "replace", crash_before_metadata)
    with pytest.raises(KeyboardInterrupt):
        encode_files([str(corpus)], "data.train", tok, tok_hash, cache)
    monkeypatch.setattr(data_mod.os, "replace", real_replace)
    (bin_path,) = cache.glob("*.bin")
    assert not bin_path.with_suffix(".json").exists() and not list(cache.glob(".*.tmp"))
    os.truncate(bin_path, 10)  # whatever the array holds, it is not read without its metadata
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_files([str(corpus)], "data.train", tok, tok_hash, cache).ids.tolist() == reference_ids(
            ref, corpus
        )


def test_run_rebuilds_a_truncated_cache(tmp_path, corpus):
    cache = tmp_path / "cache"
    spec = tiny_spec(
        corpus, tmp_path / "run", data={"train": [str(corpus)], "cache_dir": str(cache)}, train={"steps": 1}
    )
    assert main(["run", str(write_spec(tmp_path / "s.json", spec)), "--stage", "tokenizer,train"]) == 0
    bin_path, _ = cache_files(cache)
    os.truncate(bin_path, bin_path.stat().st_size - 3)
    spec["output_dir"] = str(tmp_path / "run2")
    with pytest.warns(UserWarning, match=rf"{bin_path.name} is .*truncated"):
        assert main(["run", str(write_spec(tmp_path / "s2.json", spec)), "--stage", "tokenizer,train"]) == 0


# --- a corpus too small to split ------------------------------------------------------------------


def test_tiny_corpus_says_how_many_tokens_it_has_and_needs(tmp_path, capsys, corpus):
    small = tmp_path / "small.txt"
    small.write_text("Anne walked to the village and back again, today.\n")
    assert len(small.read_bytes()) == 50
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(small)]}, tokenizer={"vocab_size": 280})
    err = fails(capsys, ["run", str(write_spec(tmp_path / "s.json", spec))], "data.train", "small.txt", "50 bytes")
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "run" / "tokenizer.model"))
    n_tokens = len(ref.encode(small.read_text())) + 1  # and the end-of-text token
    assert f"50 bytes, {n_tokens} tokens" in err
    assert f"train.seq_len + 1 = {SEQ_LEN + 1} tokens" in err and f"{2 * (SEQ_LEN + 2)} in all" in err
    assert "Add more text" in err and "lower train.seq_len" in err and "data.val" in err
    assert "only 0 tokens" not in err


def test_too_small_validation_file_is_named(tmp_path, capsys, corpus):
    small = tmp_path / "val.txt"
    small.write_text("Anne walked home.\n")
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(corpus)], "val": [str(small)]})
    err = fails(
        capsys,
        ["run", str(write_spec(tmp_path / "s.json", spec))],
        "data.val:",
        "val.txt",
        "18 bytes",
        f"train.seq_len + 1 = {SEQ_LEN + 1}",
    )
    assert "Add more text to data.val" in err


def test_small_corpus_warns_of_its_larger_validation_share(tokenizer, corpus, tmp_path):
    tok, ref, tok_hash = tokenizer
    text = corpus.read_text(encoding="utf-8")
    small = tmp_path / "small.txt"
    small.write_text(text[:800])
    n = len(reference_ids(ref, small))
    assert 2 * (SEQ_LEN + 2) <= n < (SEQ_LEN + 2) / 0.05  # big enough to split, too small for a 5% split of one window
    with pytest.warns(UserWarning) as record:
        train, val = load_splits([str(small)], [], 0.05, tok, tok_hash, tmp_path / "cache", SEQ_LEN)
    (warning,) = [w for w in record if "val_fraction" in str(w.message)]
    msg = str(warning.message)
    assert len(val) == SEQ_LEN + 2 and len(train) == n - len(val)
    assert (
        f"only {n:,} tokens" in msg
        and f"{SEQ_LEN + 2} tokens, {(SEQ_LEN + 2) / n:.1%} of it instead of val_fraction 5.0%" in msg
    )
    assert f"train.seq_len + 1 = {SEQ_LEN + 1}" in msg and "data.val" in msg
    assert train.ids.tolist() + val.ids.tolist() == reference_ids(ref, small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corpus large enough for its fraction: no warning
        train, val = load_splits([str(corpus)], [], 0.05, tok, tok_hash, tmp_path / "cache", SEQ_LEN)
    assert len(val) == int((len(train) + len(val)) * 0.05)


def test_run_warns_of_the_validation_share_as_one_aic_line(tmp_path, corpus):
    """Through `aic run`; the CLI prints warnings raised in aic_core as `aic: warning: MESSAGE`."""
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text(encoding="utf-8")[:800])
    spec = tiny_spec(
        corpus, tmp_path / "run", data={"train": [str(small)]}, train={"steps": 1}, tokenizer={"vocab_size": 330}
    )
    with pytest.warns(UserWarning) as record:
        assert main(["run", str(write_spec(tmp_path / "s.json", spec)), "--stage", "tokenizer,train"]) == 0
    (w,) = [w for w in record if "val_fraction" in str(w.message)]
    line = _format_warning(w.message, w.category, w.filename, w.lineno)
    assert line.startswith("aic: warning: data.val_fraction: the corpus is only ") and line.count("\n") == 1
