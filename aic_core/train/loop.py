"""The training loop every trainer runs, written once: the cadence of logging, evaluation and checkpoints, the
progress display, throughput, Ctrl-C, the final evaluation and the final save.

A trainer plugin gives the loop what differs between trainers, as a `TrainSteps` (from `TrainerPlugin.steps`):
how to take one optimizer step over this rank's micro-batches, how to save its state at a step, which module
to evaluate, and what to do once training is complete. The loop decides when each happens:

- every step: `steps.step(step, batches)`; every `train.log_every` steps (and the last) a metrics record and a
  progress line with the loss averaged over the step's micro-batches and ranks;
- every `eval.every` steps (before the last) and at `train.steps`: an evaluation of `steps.eval_model()`;
- every `train.checkpoint_every` steps (before the last) and at the end: `steps.save(step, metrics)`, with
  the validation metrics when they were measured at that step;
- Ctrl-C: the step in progress finishes (on every rank: the ranks agree at each step), a checkpoint is saved
  at the step reached, and KeyboardInterrupt is raised.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from aic_core.train.common import CtrlC, MetricsLog, NoLog, Progress, Throughput, evaluate, train_batch

if TYPE_CHECKING:
    from aic_core.plugins.kinds import TrainJob


class MicroBatches:
    """This rank's micro-batches of one optimizer step, `len(batches)` of them (train.grad_accum / world size),
    each a tuple on the device, made as it is taken (`aic_core.train.common.train_batch`): (inputs, targets), or
    (inputs, targets, documents) for packed chat data. A trainer passes it whole: `model(*batch)`."""

    def __init__(self, job: TrainJob, step: int, seq_len: int, device: torch.device) -> None:
        self.job, self.step, self.seq_len, self.device = job, step, seq_len, device
        self.count = job.spec.train.grad_accum // job.dist.world_size

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        job, dist = self.job, self.job.dist
        for micro in range(self.count):
            yield train_batch(
                job.train_data, job.spec, self.step, micro, self.seq_len, self.device, dist.rank, dist.world_size
            )


class TrainSteps(ABC):
    """What a trainer gives the core's training loop (`TrainerPlugin.steps` returns one, set up: the model on
    its device, the optimizer and schedule made and, on resume, restored).

    `device`: where this rank's batches go. `start`: the step training continues from (0, or the step of the
    checkpoint resumed from). `autocast`: the context evaluation runs under (a trainer that casts the model
    itself leaves the default, none)."""

    def __init__(
        self, device: torch.device, start: int = 0, autocast: AbstractContextManager[Any] | None = None
    ) -> None:
        self.device, self.start = device, start
        self.autocast = nullcontext() if autocast is None else autocast

    @abstractmethod
    def step(self, step: int, batches: MicroBatches) -> tuple[torch.Tensor, float]:
        """One optimizer step (number `step`, from 0) over this rank's micro-batches: forward, backward, clip,
        the optimizer and the schedule. Returns the sum of the micro-batches' losses (a tensor, not yet read:
        the loop reads it only on log steps) and the learning rate the step used."""

    @abstractmethod
    def save(self, step: int, metrics: dict[str, float] | None) -> None:
        """Write the checkpoint of `step` (through `job.save_checkpoint`: every rank calls this). `metrics`: the
        validation metrics measured at that step, or None."""

    @abstractmethod
    def eval_model(self) -> torch.nn.Module:
        """The module to evaluate: the plain model (not a DDP or compiled wrapper); its forward gives the loss."""

    def begin(self, log: MetricsLog | NoLog) -> None:  # noqa: B027 - optional, as `finish`
        """The metrics log is open (after the resume event, before the first step): write the trainer's own
        events there. Default: none."""

    def finish(self) -> None:  # noqa: B027 - optional: most trainers have nothing to do
        """Training is complete and saved: leave `job.model` holding the final weights, whole, for the eval and
        generate stages (a trainer that shards them gathers them back). Not called when training stops early
        (an error, Ctrl-C). Default: nothing to do."""


def train_loop(job: TrainJob, steps: TrainSteps) -> None:
    """Train from `steps.start` to train.steps (or `job.stop_at`), logging, evaluating and checkpointing into
    `job.run_dir` as the spec says. The model recomputes activations as train.activation_checkpointing says."""
    spec, t, dist = job.spec, job.spec.train, job.dist
    job.model.activation_checkpointing = t.activation_checkpointing  # per-block recompute (the Transformer's)
    seq_len = t.seq_len or job.model.config.block_size
    start, device = steps.start, steps.device
    end = min(t.steps, job.stop_at or t.steps)
    micro_steps = t.grad_accum // dist.world_size  # this rank's share of the step's micro-batches
    tokens_per_step = t.batch_size * t.grad_accum * seq_len

    saved, metrics_step = None, None  # the step last checkpointed; the step `metrics` were measured at
    metrics: dict[str, float] = {}

    def checkpoint(step: int) -> None:
        nonlocal saved
        # Validation metrics go with the checkpoint only if measured at its step (else the eval stage measures).
        steps.save(step, metrics if metrics_step == step else None)
        saved = step

    def measure() -> dict[str, float]:
        return evaluate(steps.eval_model(), job.val_data, spec, seq_len, device, steps.autocast, dist)

    log = MetricsLog.for_run(job.run_dir, t, enabled=dist.is_main)
    if start:
        log.write(event="resume", step=start)
    steps.begin(log)
    bar = Progress(end, start, enabled=dist.is_main)
    meter = Throughput(tokens_per_step, start)
    done = start
    ctrl_c = CtrlC()
    try:
        ctrl_c.__enter__()
        for step in range(start, end):
            loss_sum, lr = steps.step(step, MicroBatches(job, step, seq_len, device))
            done = step + 1
            if done % t.log_every == 0 or done == end:
                loss_value = dist.mean(loss_sum).item() / micro_steps  # syncs: only on log steps
                tok_s = meter.rate(done)
                log.write(step=done, loss=loss_value, lr=lr, tokens_per_s=round(tok_s, 1))
                bar.log(done, loss_value, lr, tok_s)
            bar.update()
            if spec.eval.every and done % spec.eval.every == 0 and done < t.steps:
                with meter.paused():
                    metrics, metrics_step = measure(), done
                log.write(step=done, **metrics)
                bar.write(f"step {done}: val_loss {metrics['val_loss']:.4f}  val_bpb {metrics['val_bpb']:.4f}")
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < end:
                with meter.paused():
                    checkpoint(done)
            if ctrl_c.agreed(dist) and done < end:
                break
        if ctrl_c.requested and done < end:  # Ctrl-C: keep the steps done so far, then stop
            if done > start and saved != done:
                checkpoint(done)
            if saved is not None:
                bar.write(f"interrupted after step {done}: saved checkpoint step-{saved}", file=sys.stderr)
            raise KeyboardInterrupt
        if end == t.steps:
            metrics, metrics_step = measure(), end
            log.write(step=end, **metrics)
            bar.write(
                f"step {end}: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}  "
                f"val_bpb {metrics['val_bpb']:.4f}"
            )
        if end > start or job.resume_from is None:
            checkpoint(end)
        if ctrl_c.requested:  # Ctrl-C during the last step or the final evaluation: training is complete and saved
            raise KeyboardInterrupt
    finally:
        ctrl_c.__exit__()
        bar.close()
        log.close()
    steps.finish()
