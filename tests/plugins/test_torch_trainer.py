"""The torch trainer: schedule, decay groups, device and precision choices; CUDA runs marked gpu."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aic_core.cli import main
from aic_core.errors import SpecError
from aic_core.model.loading import load_checkpoint_model
from aic_core.plugins.registry import get_registry
from aic_core.spec import TrainSpec, parse_spec
from aic_core.train.common import Throughput, lr_at, param_groups
from tests.conftest import tiny_spec, write_spec


def test_lr_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    t = TrainSpec(trainer={"type": "torch"}, steps=110, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert [lr_at(s, t) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    for s in (10, 35, 60, 85, 110):
        progress = (s - 10) / 100
        assert lr_at(s, t) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * 9e-4)


def test_weight_decay_applies_to_matrices_and_embeddings_only(corpus, tmp_path):
    spec = parse_spec(tiny_spec(corpus, tmp_path), get_registry())
    from aic_core.model.loading import build_model

    model = build_model(spec, get_registry(), 400)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} >= {
        "wte.weight",
        "positional.wpe.weight",
        "blocks.0.attn.qkv.weight",
    }
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_throughput_leaves_out_the_time_paused_for_evaluation_and_checkpoints():
    now = [100.0]
    meter = Throughput(tokens_per_step=1000, step=0, clock=lambda: now[0])
    now[0] += 2.0  # 10 steps in 2 s
    assert meter.rate(10) == pytest.approx(5000.0)
    with meter.paused():
        now[0] += 7.0  # an evaluation
    now[0] += 1.0  # 5 steps in 1 s
    with meter.paused():
        now[0] += 3.0  # a checkpoint
    assert meter.rate(15) == pytest.approx(5000.0)
    now[0] += 4.0  # nothing paused: all of the time counts
    assert meter.rate(17) == pytest.approx(500.0)


@pytest.mark.parametrize("trainer", ["torch", "deepspeed"])
def test_tokens_per_s_logged_after_an_evaluation_is_the_training_speed(corpus, tmp_path, monkeypatch, trainer):
    """An evaluation that takes 1,000 s (of a clock the test moves on) sits in the window of the step-4 log line;
    the figure must not count it. No real time is asserted: the steps may take as long as a busy machine makes them."""
    if trainer == "deepspeed":
        pytest.importorskip("deepspeed")
    import importlib
    import time

    module = importlib.import_module("aic_core.train.loop")  # the loop every trainer runs evaluates
    real, offset = module.evaluate, [0.0]

    def clock() -> float:
        return time.perf_counter() + offset[0]

    class Meter(module.Throughput):
        def __init__(self, tokens_per_step: int, step: int) -> None:
            super().__init__(tokens_per_step, step, clock)

    def slow_evaluate(*args, **kwargs):
        offset[0] += 1000.0
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "Throughput", Meter)
    monkeypatch.setattr(module, "evaluate", slow_evaluate)
    spec = tiny_spec(
        corpus,
        tmp_path / "run",
        train={"steps": 6, "log_every": 2, "trainer": {"type": trainer}},
        eval={"batches": 1, "every": 2},
    )
    assert main(["run", str(write_spec(tmp_path / "s.json", spec)), "--stage", "tokenizer,train"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rate = {r["step"]: r["tokens_per_s"] for r in records if "tokens_per_s" in r}
    tokens_per_step = 4 * 32
    # With the evaluation's 1,000 s counted, the figure would be under 2 steps' tokens / 1,000 s; without it, two
    # steps of this tiny model would have to take 100 s to fall under the bound.
    assert rate[4] > 2 * tokens_per_step / 100, rate
    assert rate[6] > 2 * tokens_per_step / 100, rate


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "trainer, field",
    [({"type": "torch", "device": "cuda"}, "device"), ({"type": "torch", "precision": "bf16"}, "precision")],
)
def test_cuda_only_settings_are_refused_on_a_cpu_machine(corpus, tmp_path, trainer, field):
    with pytest.raises(SpecError, match=f"train.trainer.{field}"):
        parse_spec(tiny_spec(corpus, tmp_path, train={"trainer": trainer}), get_registry())


def _val_losses(run_dir):
    return [
        r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("compile_model", [False, True])
def test_trains_on_cuda_in_bf16_and_the_checkpoint_loads_on_cpu(corpus, tmp_path, compile_model):
    trainer = {"type": "torch", "device": "cuda", "precision": "bf16", "compile": compile_model}
    spec = tiny_spec(
        corpus,
        tmp_path / "run",
        train={"trainer": trainer, "steps": 60, "log_every": 10},
        eval={"every": 20, "batches": 4},
    )
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    val = _val_losses(tmp_path / "run")
    assert len(val) == 3 and val[-1] < val[0] < math.log(400) + 0.5
    loaded = load_checkpoint_model(tmp_path / "run", device="cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert (tmp_path / "run" / "samples.txt").read_text().count("=== sample") == 2


@pytest.mark.gpu
def test_cuda_and_cpu_give_the_same_greedy_text(corpus, tmp_path):
    from aic_core.generate import generate
    from aic_core.spec import SamplerSpec

    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 20}, model={"dropout": 0.0})
    assert main(["run", str(write_spec(tmp_path / "s.json", spec)), "--stage", "tokenizer,train"]) == 0
    greedy = SamplerSpec(temperature=0)
    texts = {}
    for device in ("cpu", "cuda"):
        loaded = load_checkpoint_model(tmp_path / "run", device=device)
        texts[device] = generate(loaded.model, loaded.tokenizer, ["Anne", "It was"], 16, greedy)
    assert texts["cpu"] == texts["cuda"]
