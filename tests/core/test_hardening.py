"""Bad input on the command line and in specs: exit 2, one paragraph, nothing already written is lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aic_core.cli import main
from aic_core.plugins.registry import get_registry
from aic_core.spec import parse_spec
from tests.conftest import REPO, tiny_spec, write_spec


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder (the lock file aside) and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".aic.lock"
    }


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("hardening")
    spec = tiny_spec(corpus, tmp / "run", train={"checkpoint_every": 4})
    path = write_spec(tmp / "spec.json", spec)
    assert main(["run", str(path)]) == 0
    return path, tmp / "run", spec


# --- spec files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("n_layer", True), ("n_layer", "4"), ("n_layer", 2.0)],
)
def test_spec_numbers_are_strict(tmp_path, corpus, field, value):
    spec = tiny_spec(corpus, tmp_path / "run")
    spec["model"][field] = value
    with pytest.raises(Exception) as info:
        parse_spec(spec, get_registry(), check=False)
    assert f"model.{field}" in str(info.value) and "valid integer" in str(info.value)


def test_spec_float_strings_and_bool_strings_are_refused_but_ints_fill_floats(tmp_path, corpus):
    registry = get_registry()
    spec = tiny_spec(corpus, tmp_path / "run", train={"lr": "2e-3"})
    with pytest.raises(Exception, match=r"train\.lr: Input should be a valid number"):
        parse_spec(spec, registry, check=False)
    spec = tiny_spec(corpus, tmp_path / "run", generate={"use_cache": "true"})
    with pytest.raises(Exception, match=r"generate\.use_cache: Input should be a valid boolean"):
        parse_spec(spec, registry, check=False)
    spec = tiny_spec(corpus, tmp_path / "run", train={"lr": 1, "min_lr": 0})  # JSON ints where floats go
    parsed = parse_spec(spec, registry, check=False)
    assert parsed.train.lr == 1.0 and isinstance(parsed.train.lr, float)


def test_plugin_options_are_strict_too(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", tokenizer={"type": "sentencepiece", "vocab_size": "400"})
    with pytest.raises(Exception, match=r"tokenizer\.vocab_size: Input should be a valid integer"):
        parse_spec(spec, get_registry(), check=False)


def test_comments_in_a_spec_are_named(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text('{\n  "name": "x", // a comment\n  "seed": 1\n}\n')
    assert main(["validate", str(path)]) == 2
    err = _error(capsys)
    assert "comment at line 2" in err and "no comments" in err


@pytest.mark.parametrize("content, expected", [("", "the file is empty"), ("  \n", "the file is empty")])
def test_empty_spec_file(tmp_path, capsys, content, expected):
    path = tmp_path / "spec.json"
    path.write_text(content)
    assert main(["validate", str(path)]) == 2
    assert expected in _error(capsys)


def test_directory_as_spec(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert "is a directory, not a spec file" in _error(capsys)


def test_every_json_block_in_the_readme_is_valid_json():
    readme = (REPO / "README.md").read_text()
    assert "```jsonc" not in readme
    blocks = re.findall(r"```json\n(.*?)```", readme, re.S)
    assert blocks
    for block in blocks:
        text = block.strip()
        try:
            json.loads(text)
        except json.JSONDecodeError:
            json.loads("{" + text + "}")  # a fragment: keys of a spec object


def test_the_readme_spec_block_is_a_valid_spec(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = readme.split("## The spec", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    spec = json.loads(block)
    parse_spec(spec, get_registry(), base_dir=REPO / "examples", check=False)


# --- aic generate flags -----------------------------------------------------------------------------


def test_generate_max_new_tokens_zero_is_refused(trained, capsys):
    _, run_dir, _ = trained
    assert main(["generate", str(run_dir), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: 0" in _error(capsys)


def test_generate_max_new_tokens_flag_wins_over_the_spec(trained, capsys):
    _, run_dir, _ = trained
    assert main(["generate", str(run_dir), "--prompt", "Anne", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    from aic_core.model.loading import load_checkpoint_model

    tokenizer = load_checkpoint_model(run_dir).tokenizer
    generated = out[len("Anne") :].rstrip("\n")
    assert 0 < len(tokenizer.encode(generated)) <= 3


@pytest.mark.parametrize("device, expected", [("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device")])
def test_generate_unknown_device(trained, capsys, device, expected):
    _, run_dir, _ = trained
    assert main(["generate", str(run_dir), "--device", device]) == 2
    assert expected in _error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_cuda_without_cuda(trained, capsys):
    _, run_dir, _ = trained
    assert main(["generate", str(run_dir), "--device", "cuda"]) == 2
    assert "no CUDA GPU is available here" in _error(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    import aic_core

    assert capsys.readouterr().out.strip() == f"aic {aic_core.__version__}"


def test_generate_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--prompt",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--repetition-penalty",
        "--stop",
        "--seed",
        "--device",
        "--adapter",
    ):
        section = out.split(flag, 1)[1].split("\n  --", 1)[0]
        assert "default" in section, flag


# --- output_dir and --stop-at ---------------------------------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path, corpus, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, target))
    assert main(["run", str(spec)]) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert target.read_text() == "keep me"
    spec = write_spec(tmp_path / "spec2.json", tiny_spec(corpus, target / "run"))
    assert main(["run", str(spec)]) == 2
    assert "is a file, so the folder cannot be made" in _error(capsys)


def test_output_dir_that_is_not_writable(tmp_path, corpus, capsys, monkeypatch):
    # As root every folder is writable, so the permission check is made to say no.
    import aic_core.run

    monkeypatch.setattr(aic_core.run.os, "access", lambda path, mode: False)
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "run"))
    assert main(["run", str(spec)]) == 2
    assert "is not writable by this user" in _error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "stop_at, expected",
    [("-5", "--stop-at: -5 is not a step"), ("0", "--stop-at: 0 is not a step"), ("9", "is past train.steps (8)")],
)
def test_stop_at_out_of_range(tmp_path, corpus, capsys, stop_at, expected):
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "run"))
    assert main(["run", str(spec), "--stop-at", stop_at]) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_stop_at_before_the_resumed_checkpoint(trained, tmp_path, capsys):
    _, run_dir, spec = trained
    path = write_spec(tmp_path / "spec.json", {**spec, "train": {**spec["train"], "steps": 12}})
    before = _snapshot(run_dir)
    assert main(["run", str(path), "--resume", "--stop-at", "4"]) == 2
    assert "already at step 8" in _error(capsys)
    assert _snapshot(run_dir) == before


# --- the run directory lock ------------------------------------------------------------------------------


HOLD = """
import sys, time
from pathlib import Path
from aic_core.run import RunLock
with RunLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_locked_run_directory_is_refused(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, run_dir))
        assert main(["run", str(spec)]) == 2
        err = _error(capsys)
        assert f"another `aic run` (PID {holder.pid})" in err
        assert not any(run_dir.iterdir()) or {p.name for p in run_dir.iterdir()} == {".aic.lock"}
    finally:
        holder.kill()  # SIGKILL: the kernel frees the lock
        holder.wait()
    from aic_core.run import RunLock

    with RunLock(run_dir):  # the dead holder's lock is gone
        pass


# --- resume and stages with a changed spec ----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"train": {"lr": 1e-3}}, "train.lr"),
        ({"seed": 8}, "seed"),
        ({"train": {"batch_size": 2}}, "train.batch_size"),
        ({"train": {"steps": 6}}, "fewer than the 8"),
    ],
)
def test_resume_refuses_what_breaks_exactness(trained, tmp_path, capsys, change, expected):
    _, run_dir, spec = trained
    changed = json.loads(json.dumps(spec))
    for key, value in change.items():
        changed[key] = {**changed[key], **value} if isinstance(value, dict) else value
    path = write_spec(tmp_path / "spec.json", changed)
    before = _snapshot(run_dir)
    assert main(["run", str(path), "--resume"]) == 2
    assert expected in _error(capsys)
    assert _snapshot(run_dir) == before  # spec.resolved.json included


def test_resume_may_raise_the_steps_and_says_so(tmp_path, corpus, capsys):
    spec = tiny_spec(corpus, tmp_path / "run")
    path = write_spec(tmp_path / "spec.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    spec["train"]["steps"] = 10
    spec["train"]["log_every"] = 2  # bookkeeping may change too
    write_spec(path, spec)
    capsys.readouterr()
    assert main(["run", str(path), "--resume", "--stage", "tokenizer,train"]) == 0
    assert "train.steps 8 -> 10" in capsys.readouterr().out
    resolved = json.loads((tmp_path / "run" / "spec.resolved.json").read_text())
    assert resolved["train"]["steps"] == 10


def test_stages_without_train_keep_the_resolved_spec_and_use_the_new_prompts(trained, tmp_path, capsys):
    _, run_dir, spec = trained
    resolved_before = (run_dir / "spec.resolved.json").read_bytes()
    changed = {**spec, "generate": {**spec["generate"], "prompts": ["Elizabeth"]}}
    path = write_spec(tmp_path / "spec.json", changed)
    assert main(["run", str(path), "--stage", "generate"]) == 0
    assert (run_dir / "spec.resolved.json").read_bytes() == resolved_before
    samples = (run_dir / "samples.txt").read_text()
    assert samples.count("=== sample") == 1 and "\nElizabeth" in samples


def test_stages_without_train_refuse_another_model(trained, tmp_path, capsys):
    _, run_dir, spec = trained
    changed = {**spec, "model": {**spec["model"], "n_embd": 64}}
    path = write_spec(tmp_path / "spec.json", changed)
    before = _snapshot(run_dir)
    assert main(["run", str(path), "--stage", "eval,generate"]) == 2
    assert "model.n_embd: 32 -> 64" in _error(capsys)
    assert _snapshot(run_dir) == before


# --- Ctrl-C ------------------------------------------------------------------------------------------------


def test_ctrl_c_during_training_keeps_a_checkpoint_and_says_how_to_resume(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 100000, "log_every": 1}, eval={"batches": 1})
    path = write_spec(tmp_path / "spec.json", spec)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aic_core.cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"aic run {path} --resume" in err
    from aic_core.train.checkpoint import latest_checkpoint, open_checkpoint

    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and open_checkpoint(latest).step >= 3


# --- models from elsewhere -----------------------------------------------------------------------------------


def test_import_of_a_missing_folder(tmp_path, capsys):
    assert main(["import", "hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such folder" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_generate_from_a_hugging_face_folder_equals_the_run(tmp_path, corpus, capsys):
    pytest.importorskip("transformers")
    spec = tiny_spec(
        corpus,
        tmp_path / "run",
        model={
            "type": "llama",
            "n_layer": 2,
            "n_head": 2,
            "n_kv_head": 1,
            "n_embd": 32,
            "mlp_hidden": 64,
            "block_size": 32,
            "dropout": 0.0,
        },
    )
    path = write_spec(tmp_path / "spec.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    assert main(["export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    args = ["--prompt", "Anne", "--temperature", "0", "--max-new-tokens", "10"]
    assert main(["generate", str(tmp_path / "run"), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out == from_run


def test_generate_from_a_hugging_face_folder_without_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    assert main(["generate", str(tmp_path / "hf")]) == 2
    assert "without a tokenizer file aic can read" in _error(capsys)


@pytest.mark.parametrize("positional, fits", [("rope", True), ("alibi", True), ("learned", False)])
def test_prompts_longer_than_block_size_need_an_extrapolating_encoding(positional, fits):
    from aic_core.errors import GenerationError
    from aic_core.generate import generate
    from aic_core.spec import SamplerSpec
    from tests.core.test_generation import CharTokenizer

    registry = get_registry()
    gpt2 = registry.get("model", "gpt2")
    opts = gpt2.Options(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    config = gpt2.config(opts, 50)
    pos = registry.get("positional", positional)
    model = gpt2.build(opts, config, pos.build(pos.Options(), config)).eval()
    prompt = "abcdefghijklmnop"  # 16 tokens, twice block_size
    if fits:
        cached = generate(model, CharTokenizer(), [prompt], 4, SamplerSpec(temperature=0))
        assert cached == generate(model, CharTokenizer(), [prompt], 4, SamplerSpec(temperature=0), use_cache=False)
    else:
        with pytest.raises(GenerationError, match="more than the model's context of 8 tokens"):
            generate(model, CharTokenizer(), [prompt], 4, SamplerSpec(temperature=0))


@pytest.mark.parametrize(
    "path",
    [
        "runs/x/model.safetensors",
        "hf/tinyllama-tiny/config.json",
        "imported/a/state.json",
        "merged/austen-lora/x",
        "peft/austen-lora/x",
        "aic-my-plugin/pyproject.toml",
    ],
)
def test_gitignore_covers_what_the_readme_commands_write(path):
    import shutil

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
    assert result.returncode == 0, f"{path} is not ignored"


def test_disk_full_while_logging_metrics_is_a_clear_error(tmp_path):
    import errno

    from aic_core.errors import CheckpointError
    from aic_core.train.common import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    log._file = Full()
    with pytest.raises(CheckpointError, match="the disk is full .* while writing metrics.jsonl"):
        log.write(step=1, loss=1.0)


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, corpus, capsys):
    # gpt2-xl with 64 x 1024 tokens a micro-batch needs far more than any machine this runs on has.
    spec = tiny_spec(corpus, tmp_path / "run", train={"batch_size": 64})
    spec["model"] = {"type": "gpt2", "preset": "gpt2-xl"}
    path = write_spec(tmp_path / "spec.json", spec)
    assert main(["run", str(path)]) == 2
    err = _error(capsys)
    assert "this run does not fit" in err and "activations" in err and "`aic plan`" in err, err
    assert not (tmp_path / "run").exists()


def test_output_dir_flag_overrides_the_spec(tmp_path, corpus):
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "spec-dir", train={"steps": 2}))
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--output-dir", str(tmp_path / "flag-dir")]) == 0
    assert not (tmp_path / "spec-dir").exists()
    resolved = json.loads((tmp_path / "flag-dir" / "spec.resolved.json").read_text())
    assert resolved["output_dir"] == str(tmp_path / "flag-dir")
    assert (
        main(["run", str(spec), "--stage", "tokenizer,train", "--output-dir", str(tmp_path / "flag-dir"), "--resume"])
        == 0
    )  # same run: resumable


def test_generate_decode_step_flag_choices_are_the_specs():
    import typing

    from aic_core.cli import build_parser
    from aic_core.spec import DecodeStep

    generate = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions if a.dest == "decode_step"
    )
    assert tuple(generate.choices) == typing.get_args(DecodeStep)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_a_graphed_decode_step_on_the_cpu_is_refused(trained, capsys):
    _, run_dir, _ = trained
    assert main(["generate", str(run_dir), "--prompt", "Anne", "--decode-step", "compile", "--device", "cpu"]) == 2
    err = _error(capsys)
    assert "--decode-step compile" in err and "on cpu" in err and "--decode-step eager" in err
