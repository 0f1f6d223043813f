"""The core's training loop (aic_core.train.loop) and the trainer seam: a trainer gives `steps` (the loop runs
them) or `train` (a loop of its own); the schedule after a resume with more steps."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from aic_core.authoring.testing import check_trainer
from aic_core.cli import main
from aic_core.plugins.kinds import TrainerPlugin
from aic_core.plugins.registry import Registry
from aic_core.spec import TrainSpec
from aic_core.train.checkpoint import model_state
from aic_core.train.common import (
    continue_schedule,
    lr_at,
    lr_schedule,
    optimizer_step,
    restore_training,
    set_rng_state,
    training_state,
)
from aic_core.train.loop import MicroBatches, TrainSteps
from tests.conftest import tiny_spec, write_spec
from tests.core.test_registry import FakeEntryPoint, module_registering


class _SgdSteps(TrainSteps):
    """Plain SGD on the CPU, with the core's helpers for the parts every trainer shares."""

    def __init__(self, job) -> None:
        super().__init__(torch.device("cpu"))
        self.job, self.model = job, job.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=job.spec.train.lr)
        self.scheduler = lr_schedule(self.optimizer, job.spec.train)
        if job.resume_from is not None:
            ckpt, state = restore_training(job.resume_from, self.model, self.optimizer, self.scheduler)
            set_rng_state(state["rng"])
            self.start = ckpt.step
        self.model.train()

    def step(self, step: int, batches: MicroBatches):
        losses = [self.model(x, y) for x, y in batches]
        (sum(losses) / len(batches)).backward()
        return sum(loss.detach() for loss in losses), optimizer_step(self.model, self.optimizer, self.scheduler, 0.0)

    def save(self, step: int, metrics) -> None:
        self.job.save_checkpoint(step, model_state(self.model), training_state(self.optimizer, self.scheduler), metrics)

    def eval_model(self):
        return self.model


class StepsOnly(TrainerPlugin):
    """A third-party trainer that gives only its steps: the core's loop does the rest."""

    name = "steps-only"

    def steps(self, options, job):
        return _SgdSteps(job)


def test_a_trainer_that_gives_only_its_steps_trains_checkpoints_and_resumes_exactly(tmp_path):
    check_trainer(StepsOnly, {}, tmp_path)


def _trainer(name: str, **methods) -> type[TrainerPlugin]:
    return type(name.title().replace("-", ""), (TrainerPlugin,), {"name": name, **methods})


def test_a_trainer_needs_steps_or_train_and_either_is_enough():
    neither = _trainer("neither")
    old_style = _trainer("old-style", train=lambda self, options, job: None)  # as older `aic new-plugin` wrote
    steps_only = _trainer("steps-only", steps=lambda self, options, job: None)
    module = module_registering(neither, old_style, steps_only, hook="aic_register_trainers")
    registry = Registry([FakeEntryPoint("t", module)], strict=False)
    assert registry.names("trainer") == ["old-style", "steps-only"]
    (refused,) = [r for r in registry.records if r.name == "neither"]
    assert refused.status == "error" and "does not implement: steps()" in refused.error and "train()" in refused.error


def test_continue_schedule_takes_the_new_schedule_and_keeps_an_unchanged_one_exact():
    old = TrainSpec(trainer={"type": "torch"}, steps=4, lr=1e-3, warmup_steps=2)

    def trained(train: TrainSpec):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.lr)
        scheduler = lr_schedule(optimizer, train)
        for _ in range(4):
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    saved_optimizer, saved_scheduler = trained(old)
    for train in (old, old.model_copy(update={"steps": 10})):
        optimizer, scheduler = trained(train)  # fresh objects of this run, loaded from the saved state
        optimizer.load_state_dict(saved_optimizer.state_dict())
        scheduler.load_state_dict(saved_scheduler.state_dict())
        continue_schedule(scheduler)
        assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == pytest.approx(lr_at(4, train))
        if train.steps == old.steps:  # the same spec: the same number to the bit, as training straight through
            assert scheduler.get_last_lr() == saved_scheduler.get_last_lr()
            assert scheduler.state_dict() == saved_scheduler.state_dict()
    assert lr_at(4, old) != pytest.approx(lr_at(4, old.model_copy(update={"steps": 10})))


@pytest.mark.parametrize("trainer", ["torch", "deepspeed"])
def test_resume_with_more_steps_takes_the_new_schedules_lr_from_the_first_resumed_step(tmp_path, corpus, trainer):
    if trainer == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    section = {"type": trainer, "device": "cpu", "precision": "fp32"}
    if trainer == "deepspeed":
        section["stage"] = 1  # ZeRO loads the optimizer's state after the schedule's
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 4, "trainer": section}, eval={"batches": 1})
    path = write_spec(tmp_path / "spec.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    spec["train"]["steps"] = 10
    write_spec(path, spec)
    assert main(["run", str(path), "--stage", "tokenizer,train", "--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    new = TrainSpec.model_validate({**spec["train"], "trainer": {"type": trainer}})
    # Step 5 (index 4) takes the new schedule's lr, not the one the old schedule gave it (its min_lr, past its end).
    assert [logged[s] for s in range(5, 11)] == pytest.approx([lr_at(s - 1, new) for s in range(5, 11)], rel=1e-12)
    assert logged[5] != pytest.approx(lr_at(4, new.model_copy(update={"steps": 4})), rel=1e-3)
