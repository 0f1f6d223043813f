"""Pieces every trainer plugin shares: LR schedule, weight-decay groups, evaluation, metrics, RNG state."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aic_core.data import TokenData
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never biases or norm gains (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def train_batch(data: TokenData, spec: RunSpec, step: int, micro: int, seq_len: int, device, rank: int = 0, world: int = 1):
    """The micro-batch of a step; a pure function of (seed, step, micro, rank), so resume is exact."""
    index = (step * spec.train.grad_accum + micro) * world + rank
    return data.batch(spec.seed, TRAIN_STREAM, index, spec.train.batch_size, seq_len, device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: TokenData, spec: RunSpec, seq_len: int, device, autocast=None) -> dict[str, float]:
    """Mean validation loss over fixed batches (the same windows every time), perplexity, bits per byte."""
    was_training = model.training
    model.eval()
    batch_size = spec.eval.batch_size or spec.train.batch_size
    total = 0.0
    for i in range(spec.eval.batches):
        x, y = val.batch(spec.seed, EVAL_STREAM, i, batch_size, seq_len, device)
        with autocast or contextlib.nullcontext():
            total += model(x, y).item()
    model.train(was_training)
    loss = total / spec.eval.batches
    tokens_per_byte = len(val) / max(val.n_bytes, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss * tokens_per_byte / math.log(2)}


class MetricsLog:
    """Append-only metrics.jsonl, one JSON object a line, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
