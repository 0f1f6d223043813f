"""Pieces every trainer plugin shares: LR schedule, weight-decay groups, evaluation, metrics, RNG state,
the progress display and Ctrl-C handling."""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from aic_core.data.tokens import TokenData
from aic_core.devices import resolve_device  # noqa: F401 - trainers import it from here (aic_core.training)
from aic_core.train.checkpoint import Checkpoint, disk_full_error, is_disk_full, open_checkpoint
from aic_core.train.distributed import Dist

if TYPE_CHECKING:  # annotations only: the spec imports the plugin kinds, whose trainers run this
    from aic_core.spec import RunSpec, TrainSpec

EVAL_STREAM, TRAIN_STREAM = 1, 0


def lr_at(step: int, train: TrainSpec) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step. `step` counts from 0."""
    min_lr = train.lr / 10 if train.min_lr is None else train.min_lr
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(train.steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (train.lr - min_lr)


def param_groups(
    model: torch.nn.Module, weight_decay: float, shape: Callable[[torch.nn.Parameter], torch.Size] | None = None
) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never biases or norm gains (1-D tensors). `shape(p)`: a parameter's whole
    shape (default `p.shape`); a trainer whose parameters hold only a shard of themselves passes its own."""
    params = [p for p in model.parameters() if p.requires_grad]
    dims = {id(p): len(p.shape if shape is None else shape(p)) for p in params}
    return [
        {"params": [p for p in params if dims[id(p)] >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if dims[id(p)] < 2], "weight_decay": 0.0},
    ]


def adamw(
    model: torch.nn.Module, train: TrainSpec, device: torch.device, groups: list[dict] | None = None
) -> torch.optim.AdamW:
    """AdamW over `groups` (default: `param_groups`) with the spec's lr, betas and weight decay. Fused (one kernel
    updates every parameter, instead of a few kernels per tensor, and no host read of each tensor's step count) on
    CUDA and on the CPU, where torch has it since 2.4: on a small model on the CPU the step's optimizer time drops
    from about 13 ms to 2 ms. Saved with the checkpoint, the choice resumes with it, so a run resumes with the
    optimizer it started with."""
    fused = device.type in ("cuda", "cpu")
    groups = param_groups(model, train.weight_decay) if groups is None else groups
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused)


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """The spec's warmup + cosine schedule (`lr_at`) over `optimizer`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, train) / train.lr)


def continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a resume has loaded the optimizer's and the schedule's state: the learning rate of the step it
    continues at, from this run's schedule. The loaded state holds the lr the old run's schedule gave that step,
    which differs when train.steps has grown since the checkpoint was written; with the same spec this is the
    same number, computed as the schedule computes it at each step."""
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() gives, as LRScheduler.step sets it


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
) -> float:
    """The end of a training step, once the gradients are in: clip them to `grad_clip` (0: no clipping), step the
    optimizer and the schedule, clear the gradients. Returns the learning rate the step used."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def training_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The trainer state a checkpoint keeps for an exact resume (`restore_training` reads it back): the optimizer's
    and the schedule's state, and this process's random state."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}


def restore_training(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> tuple[Checkpoint, dict[str, Any]]:
    """--resume from the checkpoint folder `path`: its weights into `model`, its optimizer and schedule state into
    `optimizer` and `scheduler` (the schedule then continues as this run's: `continue_schedule`). Returns the
    checkpoint and its trainer state; the caller restores the random state from it (`set_rng_state`, or
    `restore_rng` with several processes)."""
    ckpt = open_checkpoint(path)
    model.load_state_dict(ckpt.weights())
    state = ckpt.trainer_state()  # on the CPU: RNG states must be CPU tensors; the optimizer moves its own
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    continue_schedule(scheduler)
    return ckpt, state


def train_batch(
    data: TokenData, spec: RunSpec, step: int, micro: int, seq_len: int, device, rank: int = 0, world: int = 1
):
    """Micro-batch `micro` (0 .. grad_accum / world - 1) of this rank at a step. The step's grad_accum micro-batches
    are the same whatever the world size, and rank r takes those numbered r, r + world, ...: so N processes see
    exactly the batches one process sees, and a batch is a pure function of (seed, step, micro-batch number),
    which makes resume exact, at the same or another world size."""
    index = step * spec.train.grad_accum + micro * world + rank
    return data.batch(spec.seed, TRAIN_STREAM, index, spec.train.batch_size, seq_len, device)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, val: TokenData, spec: RunSpec, seq_len: int, device, autocast=None, dist: Dist | None = None
) -> dict[str, float]:
    """Mean validation loss over fixed batches (the same windows every time), perplexity, bits per byte. With
    several processes each rank evaluates every world-th batch and the losses are summed over ranks: the same
    result as one process."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    batch_size = spec.eval.batch_size or spec.train.batch_size
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(dist.rank, spec.eval.batches, dist.world_size):
        batch = val.batch(spec.seed, EVAL_STREAM, i, batch_size, seq_len, device)
        with autocast or contextlib.nullcontext():
            total += model(*batch).double()
    model.train(was_training)
    loss = dist.mean(total).item() * dist.world_size / spec.eval.batches
    tokens_per_byte = len(val) / max(val.n_bytes, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss * tokens_per_byte / math.log(2)}


class MetricsLog:
    """Append-only metrics.jsonl, one JSON object a line, flushed at once. With `tensorboard_dir`, also each
    numeric field of a record with a step as a TensorBoard scalar there (loss -> train/loss, val_bpb -> val/bpb)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb_dir, self._tb = (None if tensorboard_dir is None else Path(tensorboard_dir)), None
        if self._tb_dir is not None:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                from aic_core.errors import TENSORBOARD_MISSING, SpecError

                raise SpecError(TENSORBOARD_MISSING) from None
        self._file = open(self.path, "a", encoding="utf-8")

    @classmethod
    def for_run(cls, run_dir: Path, train: TrainSpec, enabled: bool = True) -> MetricsLog | NoLog:
        """run_dir/metrics.jsonl, plus run_dir/tensorboard/ when `train.log_to` asks for it; on ranks other than 0
        (enabled False) a log that writes nothing."""
        if not enabled:
            return NoLog()
        run_dir = Path(run_dir)
        return cls(run_dir / "metrics.jsonl", run_dir / "tensorboard" if "tensorboard" in train.log_to else None)

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(
                    self.path.parent,
                    self.path.name,
                    "The checkpoints already written are kept.",
                    "continue with --resume",
                ) from None
            raise
        if self._tb_dir is not None and "step" in record:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run starts with its resume event: TensorBoard then drops the old events after that step.
            purge = record["step"] + 1 if record.get("event") == "resume" else None
            self._tb = SummaryWriter(str(self._tb_dir), purge_step=purge)
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self._tb.add_scalar(tag, value, record["step"], walltime=record["time"])
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(state: dict[str, Any], dist: Dist, seed: int, step: int, per_rank: bool = True) -> None:
    """This rank's random state from a checkpoint's trainer state: its own stream where the checkpoint holds one
    per rank of a world this size (and `per_rank`); else rank 0's stream, and the other ranks a fresh seed of
    their own (seed + rank + step)."""
    ranks = state.get("rng_ranks")
    if per_rank and ranks is not None and len(ranks) == dist.world_size:
        set_rng_state(ranks[dist.rank])
        return
    set_rng_state(state["rng"])
    if dist.rank:
        torch.manual_seed(seed + dist.rank + step)


class NoLog:
    """MetricsLog's stand-in on ranks other than 0."""

    def write(self, **record: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """tqdm's bar on a terminal; anywhere else (a log file, a pipe, CI) one plain line per log step, since a bar
    redrawn with \\r is one unreadable line in a log."""

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled  # disabled on ranks other than 0: rank 0 speaks for the run
        interactive = getattr(sys.stderr, "isatty", lambda: False)()
        self.bar = (
            tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
            if interactive and enabled
            else None
        )

    def log(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        elif self.enabled:
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, message: str, file=None) -> None:  # noqa: ANN001
        if self.bar is not None:
            self.bar.write(message, file=file)
        elif self.enabled:
            print(message, file=file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Training tokens/s over the steps since the last log step. Time spent evaluating or saving a checkpoint
    (`paused`) is left out, so the figure after an evaluation is the training speed, not a mix of both."""

    def __init__(self, tokens_per_step: int, step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.tokens_per_step, self.clock = tokens_per_step, clock
        self.tick, self.last = clock(), step

    def rate(self, step: int) -> float:
        """Tokens/s from the last call (or the start) to `step`; starts the next window."""
        now = self.clock()
        tok_s = self.tokens_per_step * (step - self.last) / max(now - self.tick, 1e-9)
        self.tick, self.last = now, step
        return tok_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.tick += self.clock() - start


class CtrlC:
    """Ctrl-C while training sets a flag instead of raising inside a step (which could leave the optimizer half
    updated); the loop finishes the step, saves a checkpoint and raises KeyboardInterrupt. A second Ctrl-C stops
    at once, without a checkpoint. Only the main thread can catch signals; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._installed, self._previous = False, None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except ValueError:
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        with contextlib.suppress(Exception):  # a print can collide with one the handler interrupted
            print(
                "\naic: interrupted: finishing this step to save a checkpoint "
                "(Ctrl-C again to stop at once, without one)",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self, dist: Dist) -> bool:
        """Whether any rank was asked to stop (every rank must stop at the same step: one all-reduce a step with
        several processes)."""
        if dist.active:
            flag = torch.tensor([float(self.requested)], device=dist.collective_device)
            self.requested = bool(dist.mean(flag).item() > 0)
        return self.requested

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
