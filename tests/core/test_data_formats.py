"""The data stage at scale: files, folders and globs; text (one document a file, or split by a separator), JSONL and
Parquet; bad rows; encoding in worker processes, byte for byte the same for any number of them; a cache that a
killed run left half-written is never used.

Every token file is compared with a reference made by SentencePiece itself (the tokenizer file loaded by
`sentencepiece`): each document encoded whole, then the end-of-text id, in input order. Tasks and pieces are made
tiny here (TASK_BYTES, CHUNK_CHARS) so that a 200 KB corpus is cut in hundreds of places."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

import aic_core.data.encode as encode_mod
import aic_core.data.tokens as data_mod
from aic_core.cli import main
from aic_core.data.tokens import ReadOptions, check_data_files, decoded_bytes, encode_files, tokenizer_corpus
from aic_core.errors import DataError
from aic_plugins.tokenizers.sentencepiece import SentencePiece
from tests.conftest import tiny_spec, write_spec

SEP = "<|endoftext|>"
UNICODE_DOC = (
    "Caf\u00e9 na\u00efve \u2014 \u201cquoted\u201d   three spaces,\ta tab, \u65e5\u672c\u8a9e and \U0001f642 " * 40
)


@pytest.fixture(autouse=True)
def tiny_cuts(monkeypatch):
    monkeypatch.setattr(encode_mod, "TASK_BYTES", 4096)
    monkeypatch.setattr(encode_mod, "CHUNK_CHARS", 200)
    monkeypatch.setattr(encode_mod, "MAX_CARRY", 16384)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request, tmp_path_factory, corpus):
    """(plugin tokenizer, sentencepiece reference, its file's hash)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tok = SentencePiece().train(SentencePiece.Options(vocab_size=500, model_type=request.param), [corpus], path)
    return tok, spm.SentencePieceProcessor(model_file=str(path)), data_mod.file_sha256(path)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    tok = SentencePiece().train(SentencePiece.Options(vocab_size=500), [corpus], path)
    return tok, spm.SentencePieceProcessor(model_file=str(path)), data_mod.file_sha256(path)


@pytest.fixture(scope="module")
def docs(corpus) -> list[str]:
    """Paragraph groups of the test corpus (1 to 5 paragraphs each), one long unicode document among them."""
    paragraphs = [p + "\n" for p in corpus.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    groups = ["\n".join(paragraphs[i : i + 1 + i % 5]) for i in range(0, len(paragraphs), 3)]
    return groups[:20] + [UNICODE_DOC] + groups[20:]


def reference(ref: spm.SentencePieceProcessor, documents: list[str]) -> list[int]:
    ids: list[int] = []
    for doc in documents:
        assert "\u2581" not in doc  # no special handling: a plain encode
        ids += ref.encode(doc) + [ref.eos_id()]
    return ids


def write_corpus(root: Path, docs: list[str]) -> tuple[list[str], list[str]]:
    """Every input form, holding `docs` in this order: (data.train entries, the documents they hold in order)."""
    a, b, c, d = docs[:8], docs[8:18], docs[18:26], docs[26:]
    (root / "texts" / "deeper").mkdir(parents=True)
    for i, doc in enumerate(a):  # a folder of text files, one document each (one in a sub-folder, one hidden)
        (root / "texts" / ("deeper" if i == 3 else "") / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    (root / "texts" / ".hidden.txt").write_text("never read")
    (root / "texts" / "notes.csv").write_text("not a data suffix")
    folder_order = sorted((root / "texts").rglob("[0-9]*.txt"))
    a = [p.read_text(encoding="utf-8") for p in folder_order]
    (root / "shards").mkdir()
    half = len(b) // 2
    for name, rows in (("b.jsonl", b[half:]), ("a.jsonl", b[:half])):  # a glob: read in sorted order
        lines = [json.dumps({"id": i, "text": doc}, ensure_ascii=i % 2 == 0) for i, doc in enumerate(rows)]
        (root / "shards" / name).write_text(
            "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8"
        )
    # one text file of documents split by a separator, with CRLF newlines (read as "\n"), an empty document
    # (two separators in a row) and a separator at the start and at the end (empty documents: dropped)
    joined = SEP + c[0] + SEP + SEP + SEP.join(c[1:]) + SEP
    (root / "split.txt").write_bytes(joined.replace("\n", "\r\n").encode("utf-8"))
    pq.write_table(pa.table({"id": list(range(len(d))), "text": d}), root / "rows.parquet", row_group_size=3)
    return [
        str(root / "texts"),
        str(root / "shards" / "*.jsonl"),
        str(root / "split.txt"),
        str(root / "rows.parquet"),
    ], a + b + c + d


def test_every_input_form_gives_the_reference_ids(tokenizer, docs, tmp_path):
    tok, ref, tok_hash = tokenizer
    entries, order = write_corpus(tmp_path, docs)
    data = encode_files(entries, "data.train", tok, tok_hash, tmp_path / "cache", ReadOptions(separator=SEP, workers=1))
    assert data.ids.tolist() == reference(ref, order)
    assert data.n_bytes == sum(len(doc.encode("utf-8")) for doc in order)
    assert data.ids.dtype == np.uint16


def test_one_worker_and_two_workers_write_the_same_bytes(bpe, docs, tmp_path, monkeypatch):
    tok, ref, tok_hash = bpe
    monkeypatch.setattr(encode_mod, "POOL_MIN_BYTES", 0)  # a pool of spawned workers, even for this small corpus
    entries, order = write_corpus(tmp_path, docs * 3)
    lines = []
    for workers in (1, 2):
        encode_files(
            entries,
            "data.train",
            tok,
            tok_hash,
            tmp_path / f"cache{workers}",
            ReadOptions(separator=SEP, workers=workers),
            lines.append,
        )
    assert "1 worker)" in lines[0] and "2 workers)" in lines[1]
    (one,), (two,) = (list((tmp_path / f"cache{w}").glob("*.bin")) for w in (1, 2))
    assert one.name == two.name and one.read_bytes() == two.read_bytes()
    assert np.fromfile(two, dtype=np.uint16).tolist() == reference(ref, order)


PROGRAM = """
import json, pickle, sys
import torch  # the `aic` console script imports the CLI, and with it torch, before anything else
from aic_core.data.encode import Settings, _start_pool
from aic_plugins.tokenizers.sentencepiece import SentencePieceTokenizer

class OwnTokenizer(SentencePieceTokenizer):  # a tokenizer class defined in the program itself
    pass

PROBE = ("(sorted(__import__('sys').modules), hasattr(__import__('sys').modules['__main__'], 'OwnTokenizer'), "
         "[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")

if __name__ == "__main__":
    tok = pickle.loads(open(sys.argv[1], "rb").read())
    report = {}
    for name, tokenizer in (("plugin", tok), ("own", pickle.loads(pickle.dumps(tok)))):
        if name == "own":
            tokenizer.__class__ = OwnTokenizer
        pool = _start_pool(tokenizer, Settings("text", "uint16", tok.eos_id, 1024), 2, name)
        modules, ran_again, hwm_kb = pool.submit(eval, PROBE).result()
        encodes = pool.submit(tokenizer.encode, "a test").result() == tok.encode("a test")
        report[name] = {"torch": "torch" in modules, "cli": "aic_core.cli" in modules, "ran_again": ran_again,
                        "encodes": encodes, "mb": int(hwm_kb) // 1024}
        pool.shutdown()
    print(json.dumps(report))
"""


def test_workers_start_without_the_parent_program_or_torch(bpe, tmp_path):
    """A worker runs the encoder and unpickles the tokenizer from its plugin module; it does not run the program that
    started it again (multiprocessing's spawn would, and `aic`'s console script imports torch): the built-in
    SentencePiece tokenizer needs no torch, so a worker starts in well under a second and holds tens of MB, not the
    ~230 MB of a torch import. A tokenizer class defined in the program itself still reaches the workers."""
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(bpe[0]))
    (tmp_path / "program.py").write_text(textwrap.dedent(PROGRAM))
    out = subprocess.run(
        [sys.executable, str(tmp_path / "program.py"), str(tmp_path / "tok.pkl")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["plugin"] == {
        "torch": False,
        "cli": False,
        "ran_again": False,
        "encodes": True,
        "mb": report["plugin"]["mb"],
    }
    assert report["plugin"]["mb"] < 120, report
    assert report["own"]["ran_again"] and report["own"]["encodes"], report  # the program ran again, to find its class


@pytest.mark.parametrize(
    "text", ["word " * 3000, "x" * 50_000 + " tail", "  lead " + " " * 700 + "run\n" * 30 + "end   "]
)
def test_long_documents_are_cut_where_no_piece_spans(tokenizer, text, tmp_path):
    """Cut before runs of spaces (however long the run), in the parent's blocks and in the worker's pieces; a text
    with no space for a long stretch is encoded whole."""
    tok, ref, tok_hash = tokenizer
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "d.txt").write_text(text)
    for name in ("d.jsonl", "d.txt"):
        data = encode_files([str(tmp_path / name)], "data.train", tok, tok_hash, tmp_path / "cache")
        assert data.ids.tolist() == reference(ref, [text])


# --- bad rows -------------------------------------------------------------------------------------


def bad_rows_corpus(tmp_path: Path, good: list[str]) -> tuple[Path, Path]:
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"content": "no text field", "id": 3}',
        json.dumps({"text": good[1]}).encode(),
        b'{"text": null}',
        b'{"text": "caf\xe9 is latin-1"}',
        b'{"text": ["a", "list"]}',
        b'{"text": "a lone \\ud800 surrogate"}',
        b"not json at all",
        b'["an", "array"]',
        json.dumps({"text": good[2]}).encode(),
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table({"text": pa.array([good[3].encode(), None, b"\xff\xfe", good[4].encode()], pa.binary())}), parquet
    )
    return jsonl, parquet


def test_bad_rows_are_refused_with_file_and_line(bpe, docs, tmp_path):
    tok, _, tok_hash = bpe
    jsonl, parquet = bad_rows_corpus(tmp_path, docs)
    with pytest.raises(DataError) as info:
        encode_files([str(jsonl)], "data.train", tok, tok_hash, tmp_path / "cache")
    msg = str(info.value)
    assert (
        msg.startswith("data.train[0]: bad rows")
        and 'data.bad_rows is "refuse"' in msg
        and 'set data.bad_rows to "skip"' in msg
    )
    assert "7 in the first" in msg and "..." in msg  # counted in the block where it stopped; the first five named
    for named in (
        f"{jsonl}:2: no field 'text' (its fields: 'content', 'id')",
        f"{jsonl}:4: 'text' is null null, not a string",
        f"{jsonl}:5: not UTF-8 (invalid continuation byte 0xe9",
        f'{jsonl}:6: \'text\' is array ["a", "list"], not a string',
        f"{jsonl}:7: 'text' is not UTF-8 text (a lone surrogate",
    ):
        assert named in msg, named
    assert f"{jsonl}:8" not in msg  # only the first few
    assert not list((tmp_path / "cache").glob("*")) or not list((tmp_path / "cache").glob("*.json"))
    with pytest.raises(
        DataError, match=rf"1 in the first .* (kB|bytes) read, where it stopped: {parquet} row 1: 'text' is null\. Fix"
    ):
        encode_files([str(parquet)], "data.train", tok, tok_hash, tmp_path / "cache")


def test_bad_rows_skipped_are_counted_and_the_rest_encoded(bpe, docs, tmp_path):
    tok, ref, tok_hash = bpe
    jsonl, parquet = bad_rows_corpus(tmp_path, docs)
    skip = ReadOptions(bad_rows="skip")
    with pytest.warns(
        UserWarning, match=r"^data\.train: left out 9 bad rows .*kept 5 documents: .*rows\.jsonl:2: no field"
    ) as record:
        data = encode_files([str(jsonl), str(parquet)], "data.train", tok, tok_hash, tmp_path / "cache", skip)
    assert data.ids.tolist() == reference(ref, docs[:5])
    assert "..." in str(record[0].message)  # more than the five named
    with pytest.warns(UserWarning, match="left out 9 bad rows"):  # from the cache: said again
        encode_files([str(jsonl), str(parquet)], "data.train", tok, tok_hash, tmp_path / "cache", skip)
    with pytest.raises(
        DataError, match=r"data\.train\[0\]: bad rows.*rows\.jsonl:2: no field"
    ):  # the cache does not hide them
        encode_files([str(jsonl), str(parquet)], "data.train", tok, tok_hash, tmp_path / "cache")


def test_a_text_file_that_is_not_utf8_is_refused_whatever_the_policy(bpe, tmp_path):
    tok, _, tok_hash = bpe
    path = tmp_path / "latin1.txt"
    path.write_bytes(("word " * 2000).encode() + b"caf\xe9\n")
    with pytest.raises(
        DataError,
        match=rf"data\.train\[0\]: {path} is not UTF-8 text: invalid continuation byte 0xe9 at byte 10003 \(line 1\)",
    ):
        encode_files([str(path)], "data.train", tok, tok_hash, tmp_path / "cache", ReadOptions(bad_rows="skip"))


# --- inputs that name nothing, Parquet without pyarrow ------------------------------------------


def test_inputs_that_name_nothing_are_refused_with_their_field(tmp_path, corpus):
    with pytest.raises(DataError, match=r"^data\.train\[1\]: the pattern '.*shards/\*\.jsonl' matches no file"):
        check_data_files(SimpleNamespace(train=[str(corpus), str(tmp_path / "shards" / "*.jsonl")], val=[]))
    (tmp_path / "e.jsonl").write_text("\n \n")
    with pytest.raises(
        DataError, match=r"^data\.val\[0\]: .*e\.jsonl \(from the pattern '.*\*\.jsonl'\) is empty \(only whitespace\)"
    ):
        check_data_files(SimpleNamespace(train=[str(corpus)], val=[str(tmp_path / "*.jsonl")]))
    (tmp_path / "c.txt.gz").write_bytes(b"\x1f\x8b\x08")
    with pytest.raises(DataError, match=r"^data\.train\[0\]: .*c\.txt\.gz is compressed \(\.gz\).*gunzip"):
        check_data_files(SimpleNamespace(train=[str(tmp_path / "c.txt.gz")], val=[]))


def test_a_parquet_column_that_is_not_there_or_not_text(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"txt": ["a b c"], "n": [1]}), path)
    with pytest.raises(
        DataError,
        match=r"^data\.text_field: 'text' is not a column of .*t\.parquet \(data\.train\[0\]\) "
        r"\(did you mean 'txt'\?\); its columns: txt, n",
    ):
        check_data_files(SimpleNamespace(train=[str(path)], val=[]))
    with pytest.raises(
        DataError, match=r"data\.text_field: the column 'n' of .* holds int64, not text.*string columns: txt"
    ):
        check_data_files(SimpleNamespace(train=[str(path)], val=[], text_field="n"))


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a b c"]}), path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(
        DataError,
        match=r"^data\.train\[0\]: .*t\.parquet is a Parquet file, and reading Parquet needs pyarrow.*pip install "
        r'"aic\[parquet\]"',
    ):
        check_data_files(SimpleNamespace(train=[str(path)], val=[]))


# --- the cache --------------------------------------------------------------------------------------


def test_a_killed_encoding_leaves_no_cache_and_the_next_run_encodes(bpe, docs, tmp_path):
    """A process killed (SIGKILL) while it writes the token file leaves only its temporary file: no cache. The next
    run encodes again, deletes the dead process's temporary file, and gives the reference ids."""
    tok, ref, tok_hash = bpe
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs * 4))
    cache = tmp_path / "cache"
    script = f"""
import sys, time
from pathlib import Path
import aic_core.data.encode as E
from aic_core.data.tokens import encode_files, ReadOptions
from aic_plugins.tokenizers.sentencepiece import SentencePiece
E.TASK_BYTES, E.CHUNK_CHARS, E.MAX_CARRY = 4096, 200, 16384
tok = SentencePiece().load(None, Path({str(tok.path)!r}))
encode = tok.encode
def slow(text):
    time.sleep(0.01)
    return encode(text)
tok.encode = slow
encode_files([{str(path)!r}], "data.train", tok, {tok_hash!r}, Path({str(cache)!r}), ReadOptions(workers=1))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 60
    while (
        not any(p.stat().st_size > 0 for p in cache.glob(".*.tmp"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert proc.poll() is None, "the encoding ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (left,) = cache.iterdir()
    assert (
        left.name.endswith(f".{proc.pid}.tmp") and left.stat().st_size > 0
    )  # the half-written array, under a temporary name
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = encode_files([str(path)], "data.train", tok, tok_hash, cache, echo=lines.append)
    assert lines[0].startswith("data.train: encoded 1 file")
    assert data.ids.tolist() == reference(ref, docs * 4)
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]  # the dead process's temporary file is gone


def test_a_changed_input_is_encoded_again(bpe, tmp_path):
    """The cache key is made from a stat (path, size, times): a file written again with the same size and its old
    modification time restored still gets a new key (its change time moved)."""
    tok, ref, tok_hash = bpe
    path = tmp_path / "doc.txt"
    path.write_text("Anne walked to Uppercross.\n")
    before = path.stat()
    lines = []
    encode_files([str(path)], "data.train", tok, tok_hash, tmp_path / "cache", echo=lines.append)
    encode_files([str(path)], "data.train", tok, tok_hash, tmp_path / "cache", echo=lines.append)
    assert "encoded" in lines[0] and "from the cache" in lines[1]
    time.sleep(0.01)
    path.write_text("Anne walked to Kellynch!!!\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    data = encode_files([str(path)], "data.train", tok, tok_hash, tmp_path / "cache", echo=lines.append)
    assert "encoded" in lines[2] and data.ids.tolist() == reference(ref, ["Anne walked to Kellynch!!!\n"])


def test_a_recently_modified_input_is_checked_by_content(bpe, tmp_path):
    """A file modified just before its encoding began could change again within one tick of the filesystem's clock,
    same size and times: its content hash, taken while it was encoded, is checked whenever the cache is opened."""
    tok, _, tok_hash = bpe
    path = tmp_path / "doc.txt"
    path.write_text("Anne walked to Uppercross.\n")
    encode_files([str(path)], "data.train", tok, tok_hash, tmp_path / "cache")
    (meta_path,) = (tmp_path / "cache").glob("*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["files"][0]["sha256"] == data_mod.file_sha256(path)
    meta["files"][0]["sha256"] = "0" * 64  # as if the content had changed since
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"doc\.txt changed just after it was encoded.*encoding the corpus again"):
        encode_files([str(path)], "data.train", tok, tok_hash, tmp_path / "cache")


def test_a_waiting_rank_maps_the_cache_and_never_encodes(bpe, corpus, tmp_path, monkeypatch):
    tok, _, tok_hash = bpe
    with pytest.raises(
        DataError, match=r"data\.train: the token cache .* is missing, though another process was to write it"
    ):
        encode_files([str(corpus)], "data.train", tok, tok_hash, tmp_path / "cache", may_encode=False)
    first = encode_files([str(corpus)], "data.train", tok, tok_hash, tmp_path / "cache")
    monkeypatch.setattr(data_mod, "encode_into", None)  # any encoding would fail
    assert (
        encode_files([str(corpus)], "data.train", tok, tok_hash, tmp_path / "cache", may_encode=False).ids.tolist()
        == first.ids.tolist()
    )


# --- the validation split's bytes, the tokenizer's training text -----------------------------------


def test_decoded_bytes_in_groups_equal_one_decode(bpe, docs, tmp_path):
    tok, _, tok_hash = bpe
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    ids = encode_files([str(tmp_path / "d.jsonl")], "data.train", tok, tok_hash, tmp_path / "cache").ids

    def text_bytes(part):  # the documents' text: the eos between them is no text, however decode writes it
        return len(tok.decode([i for i in part.tolist() if i != tok.eos_id]).encode("utf-8"))

    assert tok.eos_id in ids.tolist() and tok.decode([tok.eos_id]) == "</s>"
    for start in (0, 1, 777):
        assert decoded_bytes(tok, ids[start:], group=500) == text_bytes(ids[start:])
    assert decoded_bytes(tok, ids, group=500) == text_bytes(ids) == sum(len(d.encode("utf-8")) for d in docs)


def test_tokenizer_text_is_the_documents_and_the_sample_is_stated(docs, tmp_path):
    entries, order = write_corpus(tmp_path, docs)
    with tokenizer_corpus(entries, ReadOptions(separator=SEP), tmp_path / "run") as (files, described):
        texts = [Path(f).read_text(encoding="utf-8") for f in files]
        assert described.startswith(f"{len(files)} files of data.train (")
        tok = SentencePiece().train(
            SentencePiece.Options(vocab_size=500, input_sentence_size=101), files, tmp_path / "t.model"
        )
    assert not list((tmp_path / "run").iterdir())  # the temporary text is gone
    # with a separator every text file is split into documents too: each file's documents, a blank line after each
    per_file = [order[i : i + 1] for i in range(8)] + [order[8:13], order[13:18], order[18:26], order[26:]]
    assert texts == ["".join(d + "\n\n" for d in group) for group in per_file]
    assert (
        tok.training_sample.startswith("SentencePiece sampled 101 (tokenizer.input_sentence_size) of ")
        and "paragraphs" in tok.training_sample
    )


def test_run_on_jsonl_shards_states_the_sample(tmp_path, docs, corpus, capsys):
    (tmp_path / "shards").mkdir()
    for k in range(3):
        (tmp_path / "shards" / f"{k}.jsonl").write_text("".join(json.dumps({"body": doc}) + "\n" for doc in docs[k::3]))
    spec = tiny_spec(
        corpus, tmp_path / "run", data={"train": ["shards/*.jsonl"], "text_field": "body"}, train={"steps": 1}
    )
    assert main(["run", str(write_spec(tmp_path / "s.json", spec)), "--stage", "tokenizer,train"]) == 0
    out = capsys.readouterr().out
    assert (
        "tokenizer: trained sentencepiece" in out
        and "3 files of data.train" in out
        and f"{len(docs)} documents as text" in out
    )
    assert "SentencePiece read all" in out
    assert "data.train: encoded 3 files" in out and f"{len(docs)} documents" in out


def test_spec_names_a_bad_data_entry(tmp_path, corpus, capsys):
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(corpus), ""], "format": "csv"})
    assert main(["validate", str(write_spec(tmp_path / "s.json", spec))]) == 2
    err = capsys.readouterr().err
    assert "data.train[1]: String should have at least 1 character" in err
    assert "data.format: Input should be 'auto', 'text', 'jsonl', 'parquet' or 'chat'" in err
