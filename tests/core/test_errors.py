"""Bad input: a clear one-paragraph error and exit code 2, never a traceback; nothing already written is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from aic_core.cli import main
from tests.conftest import tiny_spec, write_spec


def fails(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "aic: error: " in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("errors")
    spec = tiny_spec(corpus, tmp / "run", train={"steps": 2})
    assert main(["run", str(write_spec(tmp / "spec.json", spec)), "--stage", "tokenizer,train"]) == 0
    return spec, tmp / "run"


def test_misspelt_key_names_path_and_close_match(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run")
    spec["model"]["n_heads"] = spec["model"].pop("n_head")
    fails(capsys, ["validate", str(write_spec(tmp_path / "s.json", spec))], "model.n_heads", "did you mean 'n_head'?")


def test_unknown_top_level_key(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", trian={"steps": 3})
    fails(capsys, ["validate", str(write_spec(tmp_path / "s.json", spec))], "trian", "did you mean 'train'?")


def test_wrong_type_names_path_and_value(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": "many"})
    fails(capsys, ["validate", str(write_spec(tmp_path / "s.json", spec))], "train.steps", "'many'")


def test_unknown_plugin_lists_installed(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run")
    spec["model"]["type"] = "gpt3"
    fails(capsys, ["validate", str(write_spec(tmp_path / "s.json", spec))], "model.type", "'gpt3'", "'gpt2'")


def test_invalid_json_and_missing_spec(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"name": "x",')
    fails(capsys, ["validate", str(tmp_path / "bad.json")], "not valid JSON", "line 1")
    fails(capsys, ["run", str(tmp_path / "nope.json")], "spec file not found")


def test_missing_data_file(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(tmp_path / "missing.txt")]})
    fails(capsys, ["run", str(write_spec(tmp_path / "s.json", spec))], "data.train", "missing.txt", "not found")


def test_empty_data_file(tmp_path, capsys, corpus):
    (tmp_path / "empty.txt").write_text("  \n")
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(tmp_path / "empty.txt")]})
    fails(capsys, ["run", str(write_spec(tmp_path / "s.json", spec))], "empty.txt", "empty")


def test_vocab_size_the_corpus_cannot_support(tmp_path, capsys, corpus):
    small = tmp_path / "small.txt"
    small.write_text("Anne walked to the village and back again.\n" * 20)
    spec = tiny_spec(corpus, tmp_path / "run", data={"train": [str(small)]}, tokenizer={"vocab_size": 5000})
    fails(capsys, ["run", str(write_spec(tmp_path / "s.json", spec))], "tokenizer.vocab_size", "5000")


def test_prompt_longer_than_the_context(trained, capsys):
    _, run_dir = trained
    fails(capsys, ["generate", str(run_dir), "--prompt", "Anne Elliot walked " * 40], "prompt", "32")


def test_missing_checkpoint(tmp_path, capsys):
    fails(capsys, ["generate", str(tmp_path / "nothing-here")], "no such run")
    (tmp_path / "empty-run").mkdir()
    fails(capsys, ["generate", str(tmp_path / "empty-run")], "holds no checkpoint")


def test_corrupt_checkpoint(tmp_path, capsys, trained):
    import shutil

    _, run_dir = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    weights = copy / "checkpoints" / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    fails(capsys, ["generate", str(copy)], "model.safetensors", "corrupt")


def test_checkpoint_with_another_tokenizer(tmp_path, capsys, trained):
    import shutil

    _, run_dir = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    tok = copy / "checkpoints" / "step-2" / "tokenizer.model"
    tok.write_bytes(tok.read_bytes() + b"\x00")
    fails(capsys, ["generate", str(copy)], "tokenizer", "not the one the model was trained with")


def test_rerun_without_resume_keeps_the_checkpoints(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 2})
    path = write_spec(tmp_path / "s.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"
    before = ckpt.read_bytes()
    fails(capsys, ["run", str(path)], "already holds", "--resume")
    assert ckpt.read_bytes() == before


def test_resume_with_a_changed_model_is_refused(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 4})
    path = write_spec(tmp_path / "s.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train", "--stop-at", "2"]) == 0
    spec["model"]["n_embd"] = 64
    write_spec(path, spec)
    fails(capsys, ["run", str(path), "--resume"], "model.n_embd", "32", "64")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()] == ["step-2"]


def test_resume_without_a_checkpoint(tmp_path, capsys, corpus):
    path = write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run"))
    fails(capsys, ["run", str(path), "--resume"], "no checkpoint to resume")


def test_unknown_stage(tmp_path, capsys, corpus):
    path = write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run"))
    fails(capsys, ["run", str(path), "--stage", "trian"], "trian", "did you mean 'train'?")
