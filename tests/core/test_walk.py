"""What a new user's walk found (issue 24, part 7): bad input and broken disks give exit 2 and one clear paragraph,
silent surprises get a warning, advice is right, and killed runs leave no litter behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from aic_core.cli import main
from aic_core.plugins.registry import get_registry
from tests.conftest import tiny_spec, write_spec
from tests.core.test_hardening import _error, _snapshot


def _deny_write(monkeypatch, *paths: Path) -> None:
    """As if `paths` were read-only to this user (tests may run as root, for whom every folder is writable)."""
    real, denied = os.access, {str(p) for p in paths}

    def access(path, mode, *args, **kwargs):
        if str(path) in denied and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[Path, dict]:
    """A tiny run trained to step 8 with checkpoints at 4 and 8 (copy it before changing it)."""
    tmp = tmp_path_factory.mktemp("walk")
    spec = tiny_spec(corpus, tmp / "run", train={"checkpoint_every": 4})
    path = write_spec(tmp / "spec.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    return tmp / "run", spec


@pytest.fixture
def run_copy(trained, tmp_path) -> tuple[Path, dict]:
    """A copy of the trained run, and a spec for it that resumes to step 12."""
    run_dir, spec = trained
    shutil.copytree(run_dir, tmp_path / "run")
    spec = {**spec, "output_dir": str(tmp_path / "run"), "train": {**spec["train"], "steps": 12}}
    return tmp_path / "run", spec


# --- the run directory -----------------------------------------------------------------------------------


def test_an_output_dir_that_cannot_be_made_is_a_clear_error(tmp_path, corpus, capsys):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc, a folder in which no folder can be made")
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "run"))
    assert main(["run", str(spec), "--output-dir", "/proc/aic-run"]) == 2
    err = _error(capsys)
    assert "output_dir: /proc/aic-run" in err and "cannot be made" in err, err
    assert not (tmp_path / "run").exists()


# --- hints that say how to go on ---------------------------------------------------------------------------


def test_the_ctrl_c_hint_keeps_the_output_dir(tmp_path, corpus, capsys, monkeypatch):
    trainer = get_registry().get("trainer", "torch")

    def interrupted(options, job):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "elsewhere"))
    out_dir = tmp_path / "out dir"
    assert main(["run", str(spec), "--output-dir", str(out_dir), "--stage", "tokenizer,train"]) == 130
    err = _error(capsys)
    assert f"Continue with `aic run {spec} --output-dir '{out_dir}' --resume`" in err, err


def test_the_stop_at_hint_keeps_the_output_dir(tmp_path, corpus, capsys):
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "elsewhere", train={"steps": 3}))
    out_dir = tmp_path / "out"
    assert main(["run", str(spec), "--output-dir", str(out_dir), "--stop-at", "1"]) == 0
    assert f"continue with `aic run {spec} --output-dir {out_dir} --resume`" in capsys.readouterr().out
    assert not (tmp_path / "elsewhere").exists()


def test_the_missing_tokenizer_hint_keeps_the_output_dir(tmp_path, corpus, capsys):
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "elsewhere"))
    out_dir = tmp_path / "out"
    assert main(["run", str(spec), "--output-dir", str(out_dir), "--stage", "train"]) == 2
    assert f"`aic run {spec} --output-dir {out_dir} --stage tokenizer`" in _error(capsys)


# --- read-only parts of a run ------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["checkpoints", "metrics.jsonl"])
def test_resume_into_a_read_only_part_of_the_run_is_refused_before_training(
    run_copy, tmp_path, capsys, monkeypatch, part
):
    run_dir, spec = run_copy
    path = write_spec(tmp_path / "spec.json", spec)
    target = run_dir / part
    _deny_write(monkeypatch, target)
    before = _snapshot(run_dir)
    assert main(["run", str(path), "--resume", "--stage", "train"]) == 2
    err = _error(capsys)
    assert f"{target}: not writable by this user" in err and "nothing was changed" in err, err
    assert _snapshot(run_dir) == before


# --- the tokenizer stage -----------------------------------------------------------------------------------


def test_a_full_disk_while_training_the_tokenizer_is_a_clear_error(tmp_path, corpus, capsys, monkeypatch):
    import sentencepiece as spm

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", full)
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "run"))
    assert main(["run", str(spec), "--stage", "tokenizer"]) == 2
    err = _error(capsys)
    assert "the disk is full" in err and "the tokenizer" in err and "run the same command again" in err, err
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name != ".aic.lock"] == ["spec.resolved.json"]


def test_the_tokenizer_stage_removes_what_a_killed_one_left(tmp_path, corpus):
    run_dir = tmp_path / "run"
    for litter in (".tokenizer.model.k1ll3d.tmp", ".tokenizer-text-k1ll3d"):
        (run_dir / litter).mkdir(parents=True)
        (run_dir / litter / "part").write_text("left by a kill -9")
    spec = write_spec(tmp_path / "spec.json", tiny_spec(corpus, run_dir))
    assert main(["run", str(spec), "--stage", "tokenizer"]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == [".aic.lock", "spec.resolved.json", "tokenizer.model"]


# --- warnings for specs that run but do not do what they seem to -------------------------------------------


def _validate_warnings(tmp_path, spec: dict) -> list[str]:
    path = write_spec(tmp_path / "spec.json", spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["validate", str(path)]) == 0
    return [str(w.message) for w in caught]


def test_an_adapter_on_a_fresh_model_is_warned_about(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", adapter={"type": "lora", "r": 4})
    [warning] = _validate_warnings(tmp_path, spec)
    assert warning.startswith("adapter: ") and "model.init_from" in warning and "random" in warning, warning


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 8, "warmup_steps": 20, "lr": 1e-3})
    [warning] = _validate_warnings(tmp_path, spec)
    assert warning.startswith("train.warmup_steps: 20 is more than train.steps (8)"), warning
    assert "40% of train.lr (4.00e-04" in warning, warning
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 8, "warmup_steps": 8})
    assert _validate_warnings(tmp_path, spec) == []  # the last step reaches the peak


def test_aic_run_warns_as_validate_does(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 1, "warmup_steps": 2})
    path = write_spec(tmp_path / "spec.json", spec)
    with pytest.warns(UserWarning, match=r"train\.warmup_steps: 2 is more than train\.steps \(1\)"):
        assert main(["run", str(path), "--stage", "tokenizer"]) == 0


# --- data ---------------------------------------------------------------------------------------------------


def test_a_cache_dir_that_is_a_file_is_a_clear_error(tmp_path, corpus, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    spec = tiny_spec(corpus, tmp_path / "run", data={"cache_dir": str(taken)})
    path = write_spec(tmp_path / "spec.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 2
    err = _error(capsys)
    assert f"data.cache_dir: {taken} is a file, not a folder" in err, err
    assert taken.read_text() == "keep me" and not (tmp_path / "run").exists()  # said before any work


def test_jsonl_whose_every_row_is_bad_says_so_at_the_tokenizer_stage(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"txt": f"row {i}"}) + "\n" for i in range(20)) + "not json\n")
    spec = tiny_spec(bad, tmp_path / "run", data={"bad_rows": "skip"})
    path = write_spec(tmp_path / "spec.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer"]) == 2
    err = _error(capsys)
    assert "data.train: no documents to train the tokenizer on: all 21 rows were left out as bad" in err, err
    assert ".tokenizer-text-" not in err


# --- DeepSpeed's raw config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, field, expected",
    [
        ({"steps_per_print": "x"}, "steps_per_print", "a number"),
        ({"wall_clock_breakdown": "yes"}, "wall_clock_breakdown", "true or false"),
        ({"fp16": {"loss_scale_window": "1000"}}, "fp16.loss_scale_window", "a number"),
        ({"prescale_gradients": 1}, "prescale_gradients", "true or false"),
    ],
)
def test_a_raw_deepspeed_value_of_the_wrong_type_is_refused_before_training(
    tmp_path, corpus, capsys, config, field, expected
):
    pytest.importorskip("deepspeed")
    trainer = {"type": "deepspeed", "stage": 0, "config": config}
    path = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "run", train={"trainer": trainer}))
    assert main(["validate", str(path)]) == 2
    err = _error(capsys)
    assert f"train.trainer.config.{field}: " in err and expected in err, err


def test_raw_deepspeed_values_of_the_right_type_pass(tmp_path, corpus, capsys):
    pytest.importorskip("deepspeed")
    config = {"steps_per_print": 100, "gradient_predivide_factor": 2, "fp16": {"loss_scale_window": 500}}
    trainer = {"type": "deepspeed", "stage": 0, "config": config}
    path = write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "run", train={"trainer": trainer}))
    assert main(["validate", str(path)]) == 0, _error(capsys)


# --- checkpoints: a full disk, a damaged `latest` ------------------------------------------------------------


def _save(run_dir: Path, step: int) -> Path:
    from aic_core.train.checkpoint import save_checkpoint

    tokenizer = run_dir.parent / "tokenizer.model"
    tokenizer.write_bytes(b"a tokenizer")
    return save_checkpoint(run_dir, step, {"w": torch.zeros(2)}, None, {}, tokenizer)


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("earlier", [False, True])
def test_a_full_disk_while_writing_latest_says_to_resume(tmp_path, monkeypatch, earlier):
    import builtins

    from aic_core.errors import CheckpointError

    if earlier:
        _save(tmp_path / "run", 1)
    real_open = builtins.open

    def open_(file, *args, **kwargs):
        return _full() if Path(file).name.startswith(".latest.") else real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path / "run", 2)
    message = str(info.value)
    assert "while writing latest" in message and "--resume" in message, message
    assert "run the same command again" not in message, message
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "state.json").is_file()  # written, and --resume finds it


def test_a_full_disk_at_resume_gives_advice_that_can_help(tmp_path, monkeypatch):
    from aic_core.errors import CheckpointError
    from aic_core.train import checkpoint

    _save(tmp_path / "run", 1)
    monkeypatch.setattr(checkpoint, "save_file", _full)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path / "run", 2)
    message = str(info.value)
    assert "the disk is full" in message and "--resume" in message, message
    # keep_last deletes only after the next checkpoint is written, and a new output_dir holds no checkpoint
    assert "set train.keep_last to keep fewer checkpoints" not in message, message
    assert "point output_dir at a larger disk" not in message, message
    assert "keep_last cannot make this room" in message, message


def test_a_latest_pointer_naming_a_missing_step_says_so(tmp_path):
    from aic_core.train.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    _save(run_dir, 1)
    (run_dir / "checkpoints" / "latest").write_text("step-99\n")
    with pytest.warns(UserWarning, match=r"checkpoints/latest names step-99, which is missing.*using step-1"):
        assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-1"


def test_report_on_a_read_only_run_directory_is_a_clear_error(trained, capsys, monkeypatch):
    import builtins

    run_dir, _ = trained
    before = _snapshot(run_dir)
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).parent == run_dir:  # as root every folder is writable: say no here
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    assert main(["report", str(run_dir)]) == 2
    err = _error(capsys)
    assert f"{run_dir / 'summary.json'}: cannot be written (Permission denied)" in err, err
    assert f"Make {run_dir} writable" in err, err
    assert _snapshot(run_dir) == before


# --- aic generate --------------------------------------------------------------------------------------------


def test_a_prompt_too_long_is_refused_before_anything_is_printed(trained, capsys):
    run_dir, _ = trained
    prompts = ["Anne", "Anne Elliot was " * 40]  # the second is far longer than block_size 32
    assert (
        main(["generate", str(run_dir), "--max-new-tokens", "2", *(a for p in prompts for a in ("--prompt", p))]) == 2
    )
    out, err = capsys.readouterr()
    assert "Prompt 1 is" in err and "more than the model's context of 32 tokens" in err, err
    assert out == ""
