"""The tokenizer's bounded sample of data.train (aic_core.data.sample), and the tokenizer stage that trains on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aic_core.cli import main
from aic_core.data import sample
from aic_core.data.sample import sample_corpus
from aic_core.errors import DataError
from aic_core.model.loading import load_spec
from aic_core.plugins.registry import get_registry
from aic_core.run import _model_changes
from aic_core.spec import resolved_dict
from aic_core.train.checkpoint import list_checkpoints
from tests.conftest import REPO, tiny_spec, write_spec

EXAMPLES = REPO / "examples" / "data"


def numbered(path: Path, name: str, lines: int, width: int = 40) -> Path:
    """A text file of distinct lines "<name> line <i> ..." of about `width` bytes (some with multi-byte characters)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            text = f"{name} line {i:06d} " + ("é—✓ " if i % 3 == 0 else "abc ")
            f.write(text.ljust(width, "x") + "\n")
    return path


def windows(text: str) -> list[str]:
    """The sample's windows: its text between blank lines (each window ends with its line's newline)."""
    return [w + "\n" for w in text.split("\n\n") if w]


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of a few hundred bytes, so that small files in a test are cut into several."""
    monkeypatch.setattr(sample, "WINDOW_BYTES", 400)
    monkeypatch.setattr(sample, "MIN_WINDOW_BYTES", 100)


def test_files_within_the_limit_or_without_one_pass_through_unchanged(tmp_path):
    files = [numbered(tmp_path / "a.txt", "a", 50), numbered(tmp_path / "b.txt", "b", 50)]
    total = sum(f.stat().st_size for f in files)
    for limit in (None, 0, total, total + 1):
        with sample_corpus(files, limit, tmp_path / "run") as (got, described):
            assert got == files and described is None
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_sample_is_bounded_drawn_in_proportion_and_made_of_whole_lines(tmp_path, small_windows):
    sizes = {"a": 3000, "b": 1000, "c": 500}  # lines of each file
    files = [numbered(tmp_path / f"{name}.txt", name, n) for name, n in sizes.items()]
    sources = {f.stem: f.read_text(encoding="utf-8") for f in files}
    total = sum(f.stat().st_size for f in files)
    limit = total // 10
    with sample_corpus(files, limit, tmp_path / "run") as (got, described):
        assert len(got) == 1 and got[0].parent.parent == tmp_path / "run"
        assert got[0].parent.name.startswith(".tokenizer-text-")
        data = got[0].read_bytes()
    assert 0.9 * limit <= len(data) <= limit
    text = data.decode("utf-8")  # no character was split
    assert re.fullmatch(r"sampled 0\.0 MB of 0\.2 MB: \d+ windows spread evenly over 3 files", described), described
    per_file = dict.fromkeys(sizes, 0)
    seen: set[str] = set()
    for window in windows(text):
        name = window.split(" ", 1)[0]
        source = sources[name]
        at = source.find(window)
        assert at == 0 or source[at - 1] == "\n", window[:60]  # starts at a line's start, ends at a line's end
        lines = window.splitlines()
        assert not seen & set(lines), "windows overlap"
        seen |= set(lines)
        per_file[name] += len(window.encode("utf-8"))
    for name, n in sizes.items():  # each file's share is its part of the corpus
        assert per_file[name] / len(data) == pytest.approx(n / sum(sizes.values()), abs=0.03), per_file
    # Spread from each file's first line to its last: the first and last lines of every file are in the sample.
    for name, n in sizes.items():
        assert {f"{name} line {0:06d}", f"{name} line {n - 1:06d}"} <= {line[: len(name) + 12] for line in seen}
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())  # the temporary folder is gone


def test_windows_are_evenly_spaced_and_one_blank_line_apart(tmp_path, small_windows):
    f = numbered(tmp_path / "a.txt", "a", 10_000)
    with sample_corpus([f], 20_000, tmp_path) as (got, _):
        text = got[0].read_text(encoding="utf-8")
    assert "\n\n\n" not in text and text.endswith("\n\n")
    starts = [int(w.split()[2]) for w in windows(text)]
    assert starts[0] == 0 and len(starts) == 50  # 20,000 bytes in windows of 400
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(gaps) - min(gaps) <= 1, gaps


def test_the_sample_is_the_same_bytes_every_time(tmp_path, small_windows):
    files = [numbered(tmp_path / f"{i}.txt", str(i), 700 + 300 * i) for i in range(4)]
    outputs = []
    for _ in range(2):
        with sample_corpus(files, 9_000, tmp_path / "run") as (got, _):
            outputs.append(got[0].read_bytes())
    assert outputs[0] == outputs[1]


def test_a_line_longer_than_the_search_for_a_line_start_is_cut_at_character_boundaries(
    tmp_path, small_windows, monkeypatch
):
    monkeypatch.setattr(sample, "SCAN_BYTES", 1000)
    f = tmp_path / "long.txt"
    f.write_text(("ab✓é" * 5000 + "\n") * 3, encoding="utf-8")  # lines of 35,001 bytes, longer than any window
    with sample_corpus([f], 4_000, tmp_path) as (got, _):
        text = got[0].read_bytes().decode("utf-8")
    assert 3_000 < len(text.encode("utf-8")) <= 4_000 and set(text) == set("ab✓é\n")


def test_the_temporary_folder_goes_also_on_an_error(tmp_path, small_windows):
    f = numbered(tmp_path / "a.txt", "a", 1000)
    with pytest.raises(RuntimeError), sample_corpus([f], 5_000, tmp_path / "run") as (got, _):
        assert got[0].is_file()
        raise RuntimeError("the tokenizer failed")
    assert list((tmp_path / "run").iterdir()) == []


def test_a_missing_or_unreadable_file_is_named(tmp_path):
    f = numbered(tmp_path / "a.txt", "a", 100)
    with pytest.raises(DataError, match=r"gone\.txt: cannot be read .*readable by this user"):
        with sample_corpus([f, tmp_path / "gone.txt"], 1000, tmp_path):
            pass


def test_a_file_that_is_not_utf8_is_named_with_the_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(("plain line\n" * 100).encode() + "caf\xe9\n".encode("latin-1") + b"more\n" * 100)
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(an invalid byte at offset 1,103\)"):
        with sample_corpus([f], 1_600, tmp_path):
            pass


# --- the spec ----------------------------------------------------------------------------------------------


def test_sample_bytes_is_a_tokenizer_option_of_every_plugin_with_a_sane_minimum(tmp_path, corpus, capsys):
    spec, registry = tiny_spec(corpus, tmp_path / "run"), get_registry()
    assert load_spec(write_spec(tmp_path / "a.json", spec), registry).tokenizer.sample_bytes == 200_000_000
    spec["tokenizer"] = {"type": "bpe", "vocab_size": 400, "sample_bytes": None}
    assert load_spec(write_spec(tmp_path / "b.json", spec), registry).tokenizer.sample_bytes is None
    spec["tokenizer"]["sample_bytes"] = 1000
    assert main(["validate", str(write_spec(tmp_path / "c.json", spec))]) == 2
    assert "tokenizer.sample_bytes" in capsys.readouterr().err
    assert main(["schema"]) == 0
    assert capsys.readouterr().out.count('"sample_bytes"') >= 2  # in the section of each tokenizer plugin


# --- the tokenizer stage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def novels(tmp_path_factory) -> list[Path]:
    """Three files of about 0.9 MB: the example novels, numbered copies."""
    folder = tmp_path_factory.mktemp("novels")
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.txt")))
    files = []
    for i in range(3):
        files.append(folder / f"copy{i}.txt")
        files[-1].write_text(f"Copy {i}.\n\n{text}", encoding="utf-8")
    return files


@pytest.mark.parametrize("plugin", ["sentencepiece", "bpe"])
def test_the_tokenizer_stage_trains_on_the_sample_the_same_tokenizer_every_time(tmp_path, novels, plugin, capsys):
    made = []
    for run in ("one", "two"):
        spec = tiny_spec(novels[0], tmp_path / run, tokenizer={"type": plugin, "vocab_size": 400})
        spec["data"]["train"] = [str(f) for f in novels]
        spec["tokenizer"]["sample_bytes"] = 1_000_000
        assert main(["run", str(write_spec(tmp_path / f"{run}.json", spec)), "--stage", "tokenizer"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"sampled 1\.0 MB of 2\.\d MB: \d+ windows spread evenly over 3 files", out), out
        assert "(tokenizer.sample_bytes 1,000,000)" in out
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == [
            ".aic.lock",
            "spec.resolved.json",
            "tokenizer.model",
        ]
        made.append((tmp_path / run / "tokenizer.model").read_bytes())
    assert made[0] == made[1]


def test_a_run_with_a_checkpoint_from_before_sample_bytes_resumes_and_evaluates(tmp_path, corpus, capsys):
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run", train={"steps": 4}))
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--stop-at", "2"]) == 0
    state_path = list_checkpoints(tmp_path / "run")[-1] / "state.json"
    state = json.loads(state_path.read_text())
    del state["spec"]["tokenizer"]["sample_bytes"]  # as an aic before the option wrote it
    del state["spec"]["model"]["norm_eps"]  # an option a newer aic added, which this spec leaves at its default
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--resume"]) == 0
    assert "tokenizer: reusing" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-2", "step-4"]
    state_path = tmp_path / "run" / "checkpoints" / "step-4" / "state.json"
    state = json.loads(state_path.read_text())
    del state["spec"]["tokenizer"]["sample_bytes"]
    state_path.write_text(json.dumps(state))
    assert main(["run", str(spec), "--stage", "eval"]) == 0


def test_only_an_option_at_its_default_may_be_missing_from_a_checkpoints_spec(tmp_path, corpus):
    registry = get_registry()
    spec = load_spec(write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run")), registry)
    new = resolved_dict(spec, registry)
    old = json.loads(json.dumps(new))
    del old["model"]["norm_eps"], old["tokenizer"]["sample_bytes"]
    assert _model_changes(new, old, spec) is None
    old["tokenizer"]["sample_bytes"] = 5_000_000  # another sample trained the tokenizer file the run reuses
    assert _model_changes(new, old, spec) is None
    del old["model"]["dropout"]  # the spec sets 0.1, not the default: a change
    assert _model_changes(new, old, spec) == ("model", ["model.dropout: None -> 0.1"])
    assert _model_changes(new, old)[1] == ["model.dropout: None -> 0.1", "model.norm_eps: None -> 1e-05"]
