"""Two GPUs (NCCL): DDP and ZeRO stages 1-3 give one GPU's losses at the same global batch, and resume exactly.
Marked `multigpu`: skipped unless this machine has at least 2 CUDA GPUs.

bf16 tolerance: the one-GPU reference runs the `torch` trainer under bf16 autocast over fp32 weights; DeepSpeed
runs the model in bf16 weights with fp32 master copies, and two GPUs sum the micro-batches' gradients in another
order. For a few steps of a tiny model the losses then agree to about 1e-3 relative; 1e-2 is the bound tested."""

from __future__ import annotations

import importlib.util

import pytest

from aic_core.cli import main
from tests.conftest import tiny_spec, write_spec
from tests.core.test_multiprocess import losses, torchrun

pytestmark = [pytest.mark.multigpu, pytest.mark.slow]
BF16_RTOL = 1e-2
NCCL = {"NCCL_NVLS_ENABLE": "0"}  # NVLink multicast off, as the device machine's README asks


def spec(corpus, run_dir, trainer: dict) -> dict:
    return tiny_spec(
        corpus,
        run_dir,
        model={"dropout": 0.0},
        train={"trainer": {"device": "auto", **trainer}, "grad_accum": 2, "steps": 4, "checkpoint_every": 2},
        eval={"batches": 2},
    )


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("one-gpu") / "run"
    path = write_spec(run_dir.parent / "one.json", spec(corpus, run_dir, {"type": "torch"}))
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    return losses(run_dir)


TRAINERS = {
    "ddp": {"type": "torch"},
    **{f"zero-{k}": {"type": "deepspeed", "stage": k} for k in (1, 2, 3)},
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_two_gpus_give_one_gpu_s_losses(tmp_path, corpus, one_gpu, name):
    if TRAINERS[name]["type"] == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    run_dir = tmp_path / name
    path = write_spec(tmp_path / f"{name}.json", spec(corpus, run_dir, TRAINERS[name]))
    result = torchrun(path, "--stage", "tokenizer,train", env=dict(NCCL))
    assert result.returncode == 0, result.stderr[-3000:]
    got = losses(run_dir)
    assert list(got) == [1, 2, 3, 4]
    assert got == pytest.approx(one_gpu, rel=BF16_RTOL), name


@pytest.mark.parametrize("name", list(TRAINERS))
def test_two_gpus_resume_exactly(tmp_path, corpus, name):
    if TRAINERS[name]["type"] == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = write_spec(tmp_path / "straight.json", spec(corpus, straight, TRAINERS[name]))
    b = write_spec(tmp_path / "resumed.json", spec(corpus, resumed, TRAINERS[name]))
    for args in ((a,), (b, "--stop-at", "2"), (b, "--resume")):
        result = torchrun(args[0], "--stage", "tokenizer,train", *args[1:], env=dict(NCCL))
        assert result.returncode == 0, result.stderr[-3000:]
    # The same kernels in the same order on the same GPUs: the resumed run continues the straight one.
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=0)
