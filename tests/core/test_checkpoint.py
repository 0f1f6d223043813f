"""Checkpoints that survive the real world: a full disk, damaged files, Ctrl-C, untrusted trainer state,
retention (train.keep_last), and a log-friendly progress display."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aic_core.cli import main
from aic_core.errors import CheckpointError, SpecError
from aic_core.train import checkpoint as ck
from aic_core.train.checkpoint import (
    clean_stale,
    list_checkpoints,
    load_trainer_state,
    open_checkpoint,
    prune_checkpoints,
    save_trainer_state,
    verified,
    write_atomic,
    write_checkpoint_dir,
)
from tests.conftest import REPO, tiny_spec, write_spec

# Runs whose losses are compared for equality train on the CPU, where they are bit-exact run to run.
CPU = {"type": "torch", "device": "cpu"}


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def latest_name(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """A finished tiny run (checkpoints at steps 4 and 8); tests that change it work on a copy."""
    tmp = tmp_path_factory.mktemp("ckpt")
    spec = write_spec(tmp / "spec.json", tiny_spec(corpus, tmp / "run", train={"trainer": CPU, "checkpoint_every": 4}))
    assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 0
    return spec, tmp / "run"


def copy_run(trained, tmp_path: Path) -> tuple[Path, Path]:
    spec_path, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "run")
    spec = json.loads(spec_path.read_text())
    spec["output_dir"] = str(tmp_path / "run")
    return write_spec(tmp_path / "spec.json", spec), tmp_path / "run"


# --- 11: the trainer state is plain data, never a pickle ----------------------------------------------------


def _trainer_state_after_steps(
    steps: int = 3,
) -> tuple[dict, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    from aic_core.train.common import rng_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(steps):
        model(torch.randn(3, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    np.random.rand(5)
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state()}, opt, sched


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b), (
            path
        )
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, path


def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    import random

    from aic_core.train.common import set_rng_state

    state, _, _ = _trainer_state_after_steps()
    save_trainer_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]
    json.loads((tmp_path / "trainer_state.json").read_text())  # plain JSON
    loaded = load_trainer_state(tmp_path)
    _assert_same(state, loaded)
    # The RNG states restore: the same draws follow.
    set_rng_state(loaded["rng"])
    after = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state["rng"])
    assert (
        torch.equal(after[0], torch.rand(3))
        and np.array_equal(after[1], np.random.rand(3))
        and after[2] == random.random()
    )


def test_a_trained_checkpoint_holds_no_pickle(trained):
    _, run_dir = trained
    for ckpt in list_checkpoints(run_dir):
        assert not (ckpt / "optimizer.pt").exists()
        assert not any(f.read_bytes().startswith(b"PK\x03\x04") for f in ckpt.iterdir())  # torch.save's zip
        assert json.loads((ckpt / "trainer_state.json").read_text())["format"] == "aic-trainer-state/1"
        assert ck.load_file(str(ckpt / "trainer_state.safetensors"))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_beside_a_checkpoint_is_never_read(trained, tmp_path, capsys):
    """aic reads no pickle: an optimizer.pt where the trainer state should be is not opened, so it runs nothing."""
    spec, run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoints" / "step-8"
    (ckpt / "trainer_state.safetensors").unlink()
    (ckpt / "trainer_state.json").unlink()
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Evil(marker)}, ckpt / "optimizer.pt")
    capsys.readouterr()
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.safetensors: missing" in err and "Traceback" not in err
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(ckpt).trainer_state()
    assert not marker.exists()


# --- 9a: a SHA-256 of every file, checked on load -------------------------------------------------------------


def test_state_json_records_a_sha256_of_each_file(trained):
    _, run_dir = trained
    ckpt = open_checkpoint(run_dir)
    assert set(ckpt.files) == {
        "model.safetensors",
        "trainer_state.safetensors",
        "trainer_state.json",
        "tokenizer.model",
    }
    for name, digest in ckpt.files.items():
        assert ck.file_sha256(ckpt.path / name) == digest


def _damage_mid_file(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, then the tensors
    mid = (header + len(data)) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    path.write_bytes(bytes(data))


def test_weights_damaged_after_writing_are_refused_by_generate(trained, tmp_path, capsys):
    _, run_dir = copy_run(trained, tmp_path)
    weights = run_dir / "checkpoints" / "step-8" / "model.safetensors"
    expected = json.loads((weights.parent / "state.json").read_text())["files"]["model.safetensors"]
    _damage_mid_file(weights)
    ck.load_file(str(weights))  # the header is intact: without the hash this would load (and generate garbage)
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "Anne", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "damaged after it was written" in err and "earlier checkpoint" in err
    assert expected[:12] in err and ck.file_sha256(weights)[:12] in err
    # the earlier checkpoint still generates
    assert main(["generate", str(run_dir / "checkpoints" / "step-4"), "--prompt", "Anne", "--max-new-tokens", "4"]) == 0


def test_a_checkpoint_without_recorded_hashes_still_loads(trained, tmp_path):
    _, run_dir = copy_run(trained, tmp_path)
    state_path = run_dir / "checkpoints" / "step-8" / "state.json"
    state = json.loads(state_path.read_text())
    del state["files"]
    state_path.write_text(json.dumps(state))
    ckpt = open_checkpoint(run_dir)
    assert ckpt.files == {} and ckpt.weights() and ckpt.trainer_state()["optimizer"]


def test_damaged_trainer_state_refuses_resume(trained, tmp_path, capsys):
    spec, run_dir = copy_run(trained, tmp_path)
    _damage_mid_file(run_dir / "checkpoints" / "step-8" / "trainer_state.safetensors")
    capsys.readouterr()
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--resume"]) == 2
    assert "trainer_state.safetensors: damaged after it was written" in capsys.readouterr().err


def test_folders_written_by_write_checkpoint_dir_carry_hashes_and_adapters_are_checked(tmp_path):
    """`aic import hf` and `aic merge` write through write_checkpoint_dir; adapter files are checked with `verified`."""
    from safetensors.torch import save

    folder = tmp_path / "imported"
    adapter = save({"a": torch.ones(64)})
    write_checkpoint_dir(
        folder,
        {"w": torch.arange(64.0)},
        None,
        {"step": 0, "files": {"stale": "x"}},
        None,
        {"adapter.safetensors": adapter},
    )
    files = json.loads((folder / "state.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "adapter.safetensors"}
    assert verified(folder, "adapter.safetensors") == folder / "adapter.safetensors"
    _damage_mid_file(folder / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="adapter.safetensors: damaged after it was written"):
        verified(folder, "adapter.safetensors")


# --- 6: a full disk ------------------------------------------------------------------------------------------


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(tmp_path, corpus, monkeypatch, capsys):
    real = ck.save_file

    def full_at_step_6(tensors, filename, metadata=None):
        if ".step-6." in filename:
            with open(filename, "wb") as f:  # a partial file, as a real full disk leaves
                f.write(b"\0" * 1000)
            raise ck.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_at_step_6)
    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, run_dir, train={"checkpoint_every": 2}))
    capsys.readouterr()
    assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and str(run_dir / "checkpoints") in err and " free " in err and "step-4" in err
    assert "Traceback" not in err
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2", "step-4"]
    assert latest_name(run_dir) == "step-4" and leftovers(run_dir) == []
    assert open_checkpoint(run_dir).weights()
    monkeypatch.setattr(ck, "save_file", real)  # space freed: the run continues
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--resume"]) == 0
    assert latest_name(run_dir) == "step-8"


def test_disk_full_in_write_atomic_removes_its_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="the disk is full") as info:
        write_atomic(target, "new" * 100)
    assert str(tmp_path) in str(info.value)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `path`; the reason it could not, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        return f"mount -t tmpfs failed: {result.stderr.strip()}"
    return None


def test_a_real_full_tmpfs(tmp_path, corpus, capsys):
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "800k")  # room for one checkpoint of the tiny model (about 540 kB), not two
    if reason:
        pytest.skip(reason)
    try:
        run_dir = disk / "run"
        spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, run_dir, train={"checkpoint_every": 2}))
        capsys.readouterr()
        assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 2
        err = capsys.readouterr().err
        assert "the disk is full" in err and str(run_dir / "checkpoints") in err and "Traceback" not in err
        names = [p.name for p in list_checkpoints(run_dir)]
        assert names and latest_name(run_dir) == names[-1] and leftovers(run_dir) == []
        assert open_checkpoint(run_dir).weights() and open_checkpoint(run_dir).trainer_state()
        # write_atomic on the full disk: an error that says so, no temporary file left
        free = shutil.disk_usage(disk).free
        with pytest.raises(CheckpointError, match="the disk is full"):
            write_atomic(disk / "big.bin", b"x" * (free + 100_000))
        assert not any(p.name.startswith(".big.bin") for p in disk.iterdir()) and not (disk / "big.bin").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_removed_at_the_next_start(tmp_path, corpus):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    dead, alive = _dead_pid(), os.getppid()
    (root / f".step-6.{dead}.tmp").mkdir(parents=True)
    (root / f".step-6.{dead}.tmp" / "model.safetensors").write_bytes(b"\0" * 1000)
    (root / f".step-2.{dead}.del").mkdir()
    (root / f".latest.{dead}.tmp").write_text("step-6")
    (root / f".step-4.{alive}.tmp").mkdir()  # a live process's write in flight: left alone
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, run_dir, train={"steps": 2}))
    assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 0
    assert leftovers(run_dir) == [f".step-4.{alive}.tmp"]


def test_a_checkpoint_moved_aside_by_a_killed_run_is_restored(tmp_path):
    root = tmp_path / "checkpoints"
    dead = _dead_pid()
    (root / f".step-8.{dead}.old").mkdir(parents=True)  # killed between the renames: step-8 is missing
    (root / f".step-8.{dead}.old" / "state.json").write_text("{}")
    (root / f".step-8.{dead}.tmp").mkdir()
    clean_stale(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-8"]


# --- 12: train.keep_last -------------------------------------------------------------------------------------


def test_keep_last_keeps_the_newest_checkpoints(tmp_path, corpus):
    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, run_dir, train={"checkpoint_every": 2, "keep_last": 2}))
    assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-6", "step-8"]
    assert latest_name(run_dir) == "step-8" and leftovers(run_dir) == []


def test_keep_last_never_deletes_the_checkpoint_a_resume_started_from(tmp_path, corpus):
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    write_spec(tmp_path / "a.json", tiny_spec(corpus, straight_dir, train={"trainer": CPU, "checkpoint_every": 2}))
    assert main(["run", str(tmp_path / "a.json"), "--stage", "tokenizer,train"]) == 0
    spec = write_spec(
        tmp_path / "s.json", tiny_spec(corpus, run_dir, train={"trainer": CPU, "checkpoint_every": 2, "keep_last": 2})
    )
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--stop-at", "4"]) == 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2", "step-4"]
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--resume"]) == 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-4", "step-6", "step-8"]
    assert losses(run_dir) == losses(straight_dir)


def test_prune_never_deletes_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / "state.json").write_text("{}")
    (root / "latest").write_text("step-2\n")  # e.g. a later save failed before moving `latest`
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["step-4"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-6"]


@pytest.mark.parametrize("value", [0, -1, "2", True, 1.5])
def test_keep_last_must_be_a_positive_integer(corpus, tmp_path, value):
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import parse_spec

    with pytest.raises(SpecError, match="keep_last"):
        parse_spec(tiny_spec(corpus, tmp_path, train={"keep_last": value}), get_registry())


# --- 9b: Ctrl-C saves a checkpoint ---------------------------------------------------------------------------


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, corpus):
    steps = 120  # the interrupt lands within the first ~10 steps; the rest is margin
    run_dir, straight_dir = tmp_path / "run", tmp_path / "straight"
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, run_dir, train={"trainer": CPU, "steps": steps}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aic_core.cli", "run", str(spec), "--stage", "tokenizer,train"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) == 1
    step = open_checkpoint(ckpts[0]).step
    assert 5 <= step < steps and f"step-{step}" in err
    assert max(losses(run_dir)) == step  # the checkpoint is at the last completed step
    assert main(["run", str(spec), "--stage", "tokenizer,train", "--resume"]) == 0
    write_spec(tmp_path / "straight.json", tiny_spec(corpus, straight_dir, train={"trainer": CPU, "steps": steps}))
    assert main(["run", str(tmp_path / "straight.json"), "--stage", "tokenizer,train"]) == 0
    resumed, straight = losses(run_dir), losses(straight_dir)
    assert sorted(resumed) == sorted(straight) == list(range(1, steps + 1))
    assert resumed == straight


# --- 3: progress in a log ------------------------------------------------------------------------------------


def test_progress_is_one_plain_line_per_log_step_when_stderr_is_not_a_terminal(tmp_path, corpus, capsys):
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run", train={"steps": 8, "log_every": 2}))
    capsys.readouterr()
    assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert all("loss " in line and "lr " in line and line.endswith("tok/s") for line in lines)


def test_progress_is_a_bar_on_a_terminal(tmp_path, corpus, capsys, monkeypatch):
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run", train={"steps": 4, "log_every": 2}))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    capsys.readouterr()
    assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "train:" in err
    assert not [line for line in err.splitlines() if line.startswith("step 2/4")]
