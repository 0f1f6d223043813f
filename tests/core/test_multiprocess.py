"""`aic run` under torchrun: 2 gloo processes on the CPU train exactly as one process does, resume exactly, and
stop together when one fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aic_core.cli import main
from tests.conftest import REPO, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def torchrun(
    spec: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    paths = [str(REPO), *(env or {}).pop("EXTRA_PATH", "").split(os.pathsep), os.environ.get("PYTHONPATH", "")]
    full_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "aic",
        "run",
        str(spec),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=spec.parent)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def ddp_spec(corpus: Path, run_dir: Path, **overrides) -> dict:
    # gloo on CPU processes, also on a machine with GPUs (where "auto" would give each process a GPU)
    trainer = {"type": "torch", "device": "cpu", "precision": "fp32"}
    base = {
        "model": {"dropout": 0.0},
        "train": {"trainer": trainer, "grad_accum": 2, "steps": 6, "checkpoint_every": 3},
        "eval": {"batches": 4},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_spec(corpus, run_dir, **base)


def test_two_processes_train_exactly_as_one(tmp_path, corpus):
    one = write_spec(tmp_path / "one.json", ddp_spec(corpus, tmp_path / "one"))
    two = write_spec(tmp_path / "two.json", ddp_spec(corpus, tmp_path / "two"))
    assert main(["run", str(one), "--stage", "tokenizer,train"]) == 0
    result = torchrun(two, "--stage", "tokenizer,train")
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(double) == list(single) == [1, 2, 3, 4, 5, 6]
    assert double == pytest.approx(single, rel=1e-5)
    val = [r["val_loss"] for r in records(tmp_path / "one") if "val_loss" in r]
    assert [r["val_loss"] for r in records(tmp_path / "two") if "val_loss" in r] == pytest.approx(val, rel=1e-5)

    # Rank 0 writes every file; a 2-process run leaves what a 1-process run leaves.
    def names(d: Path) -> list[str]:
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "tensorboard" not in p.parts)

    assert names(tmp_path / "two") == names(tmp_path / "one")
    assert result.stdout.count("train: done") == 1  # one voice: rank 0's


def test_two_processes_train_chat_data_exactly_as_one(tmp_path, corpus):
    """Chat data (conversations, loss on the assistant's tokens) under DDP: the losses of one process."""
    from aic_core.data.chat import DEFAULT_SPECIALS
    from tests.core.test_chat_data import rows, write_jsonl

    write_jsonl(tmp_path / "chat.jsonl", rows(160))
    specs = {}
    for name in ("one", "two"):
        spec = ddp_spec(corpus, tmp_path / name)
        spec["data"] = {"train": [str(tmp_path / "chat.jsonl")], "format": "chat"}
        spec["tokenizer"] = {"type": "bpe", "vocab_size": 400, "special_tokens": list(DEFAULT_SPECIALS)}
        spec["generate"] = {"prompts": []}
        specs[name] = write_spec(tmp_path / f"{name}.json", spec)
    assert main(["run", str(specs["one"]), "--stage", "tokenizer,train"]) == 0
    result = torchrun(specs["two"], "--stage", "tokenizer,train")
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(double) == list(single) == [1, 2, 3, 4, 5, 6]
    assert double == pytest.approx(single, rel=1e-5)
    val = [r["val_loss"] for r in records(tmp_path / "one") if "val_loss" in r]
    assert [r["val_loss"] for r in records(tmp_path / "two") if "val_loss" in r] == pytest.approx(val, rel=1e-5)


def test_two_processes_resume_exactly(tmp_path, corpus):
    spec = ddp_spec(corpus, tmp_path / "straight", model={"dropout": 0.1})
    straight = write_spec(tmp_path / "straight.json", spec)
    resumed = write_spec(tmp_path / "resumed.json", {**spec, "output_dir": str(tmp_path / "resumed")})
    assert torchrun(straight, "--stage", "tokenizer,train").returncode == 0
    first = torchrun(resumed, "--stage", "tokenizer,train", "--stop-at", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(resumed, "--stage", "tokenizer,train", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit for bit, dropout included


FAIL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import aic_core.data.tokens
    from aic_core.errors import DataError

    def broken(*args, **kwargs):
        raise DataError("injected failure: rank 1 cannot read its data")

    aic_core.data.tokens.load_splits = broken
    import aic_core.run
    aic_core.run.load_splits = broken
"""


def test_one_failing_rank_stops_every_rank_with_its_message(tmp_path, corpus):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_RANK_1)
    spec = write_spec(tmp_path / "spec.json", ddp_spec(corpus, tmp_path / "run"))
    t0 = time.perf_counter()
    result = torchrun(
        spec, "--stage", "tokenizer,train", env={"EXTRA_PATH": str(tmp_path / "inject"), "AIC_DIST_TIMEOUT": "60"}
    )
    assert result.returncode != 0
    assert time.perf_counter() - t0 < 60  # every rank ended; none waited for the timeout
    assert "aic: error: rank 1: injected failure: rank 1 cannot read its data" in result.stderr
    assert (
        "Traceback" not in result.stderr.split("aic: error: rank 1")[0][-2000:]
    )  # the ranks print no traceback of their own


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    for name, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}.items():
        monkeypatch.setenv(name, str(value))


def test_grad_accum_that_the_world_size_does_not_divide_is_refused_before_the_group_starts(
    tmp_path, corpus, capsys, monkeypatch
):
    spec = write_spec(tmp_path / "spec.json", ddp_spec(corpus, tmp_path / "run", train={"grad_accum": 3}))
    _as_rank(monkeypatch, 0, 2)  # no MASTER_ADDR: had a process group been started, this would fail differently
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "train.grad_accum: 3 micro-batches per step cannot be shared by 2 processes" in err
    assert not (tmp_path / "run").exists()


def test_other_ranks_stay_quiet_about_an_error_every_rank_sees(tmp_path, corpus, capsys, monkeypatch):
    spec = write_spec(tmp_path / "spec.json", ddp_spec(corpus, tmp_path / "run", train={"grad_accum": 3}))
    _as_rank(monkeypatch, 1, 2)
    assert main(["run", str(spec)]) == 2
    assert capsys.readouterr().err == ""  # rank 0 says it once


def test_stages_without_training_are_refused_on_several_processes(tmp_path, corpus, capsys, monkeypatch):
    spec = write_spec(tmp_path / "spec.json", ddp_spec(corpus, tmp_path / "run"))
    _as_rank(monkeypatch, 0, 2)
    assert main(["run", str(spec), "--stage", "generate"]) == 2
    assert "only training runs on several processes" in capsys.readouterr().err


def test_python_dash_m_aic_is_the_aic_command():
    result = subprocess.run([sys.executable, "-m", "aic", "--version"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("aic ")


def test_more_processes_than_gpus_is_refused(tmp_path, corpus, capsys, monkeypatch):
    import torch

    spec = write_spec(
        tmp_path / "spec.json",
        ddp_spec(corpus, tmp_path / "run", train={"trainer": {"type": "torch", "device": "auto"}}),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _as_rank(monkeypatch, 0, 2)
    assert main(["run", str(spec)]) == 2
    assert "2 processes on this machine, but it has 1 CUDA GPU(s)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
