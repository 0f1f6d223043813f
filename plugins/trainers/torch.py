"""The PyTorch trainer: one device (CPU or CUDA) or DDP over many processes, AdamW, warmup + cosine, accumulation,
clipping, bf16 autocast on CUDA, optional torch.compile. The core's loop (aic_core.train.loop) runs its steps:
evaluation, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal

import torch
from pydantic import Field
from torch.nn.parallel import DistributedDataParallel

from aic_core.errors import SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, TrainerPlugin, TrainJob
from aic_core.spec import RunSpec
from aic_core.train.checkpoint import model_state
from aic_core.train.common import (
    adamw,
    lr_schedule,
    optimizer_step,
    resolve_device,
    restore_rng,
    restore_training,
    rng_state,
    training_state,
)
from aic_core.train.loop import MicroBatches, TrainSteps


class TorchTrainerOptions(PluginOptions):
    """Train on one device with plain PyTorch."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool = Field(
        False, description="torch.compile the model (faster steps after a compile of a minute or so)."
    )


class TorchTrainer(TrainerPlugin):
    name = "torch"
    Options = TorchTrainerOptions

    def check(self, options: TorchTrainerOptions, spec: RunSpec) -> None:
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(
                f"train.trainer.device: '{options.device}' was asked for, but no CUDA GPU is available here. "
                'Use "auto" or "cpu".'
            )
        device = resolve_device(options.device)
        if options.precision == "bf16" and device.type != "cuda":
            raise SpecError(
                "train.trainer.precision: 'bf16' needs a CUDA device; on the CPU train in 'fp32' (or leave it 'auto')."
            )

    def device(self, options: TorchTrainerOptions, local_rank: int) -> torch.device:
        return resolve_device(options.device, local_rank)

    def steps(self, options: TorchTrainerOptions, job: TrainJob) -> TrainSteps:
        return _TorchSteps(self, options, job)


class _TorchSteps(TrainSteps):
    """One device, or DDP over the launch's processes: AdamW, the spec's schedule, accumulation, clipping."""

    def __init__(self, plugin: TorchTrainer, options: TorchTrainerOptions, job: TrainJob) -> None:
        spec, t, dist = job.spec, job.spec.train, job.dist
        device = dist.device if dist.active else plugin.device(options, 0)
        bf16 = options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")
        super().__init__(device, autocast=torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.job, self.t = job, t
        self.model = model = job.model.to(device)
        self.optimizer = adamw(model, t, device)
        self.scheduler = lr_schedule(self.optimizer, t)
        if job.resume_from is not None:
            ckpt, state = restore_training(job.resume_from, model, self.optimizer, self.scheduler)
            written_by = len(state.get("rng_ranks") or [None])
            if written_by != dist.world_size:
                warnings.warn(
                    f"--resume: {ckpt.path} was written by {written_by} process(es) and this run has "
                    f"{dist.world_size}: the weights, optimizer, schedule and data order continue exactly, the "
                    f"per-rank random streams (dropout) restart.",
                    stacklevel=2,
                )
            restore_rng(state, dist, spec.seed, ckpt.step)
            self.start = ckpt.step
        # DDP averages gradients over ranks; it broadcasts rank 0's weights at construction: every replica starts equal.
        self.ddp = (
            DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            if dist.active
            else None
        )
        self.forward = torch.compile(self.ddp or model) if options.compile else (self.ddp or model)
        model.train()

    def step(self, step: int, batches: MicroBatches) -> tuple[torch.Tensor, float]:
        loss_sum = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):  # (inputs, targets) or (inputs, targets, documents)
            # Gradients are averaged over ranks once a step, on the last micro-batch, not on each one.
            sync = self.ddp is None or micro == len(batches) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast:
                    loss = self.forward(*batch)
                (loss / len(batches)).backward()
            loss_sum += loss.detach()
        return loss_sum, optimizer_step(self.model, self.optimizer, self.scheduler, self.t.grad_clip)

    def save(self, step: int, metrics: dict[str, float] | None) -> None:
        if self.job.dist.is_main:
            trainer_state, weights = training_state(self.optimizer, self.scheduler), model_state(self.model)
        else:  # rank 0 writes; the others only add their random state
            trainer_state, weights = {"rng": rng_state()}, None
        self.job.save_checkpoint(step, weights, trainer_state, metrics)

    def eval_model(self) -> torch.nn.Module:
        return self.model


@hookimpl
def aic_register_trainers(register):
    register(TorchTrainer)
