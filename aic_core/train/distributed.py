"""Many processes: what `torchrun` / `deepspeed` set (RANK, WORLD_SIZE, LOCAL_RANK), the process group, and
doing work once.

`torchrun --nproc_per_node N -m aic run spec.json` starts N copies of the same pipeline. `setup` reads the
launcher's variables, starts the process group (NCCL for CUDA devices, gloo for the CPU) with a timeout, and
returns one `Dist` that the pipeline and every trainer plugin share. Work that must happen once (training the
tokenizer, encoding the corpus, writing files) runs on rank 0 through `Dist.once`, while the others wait; an
error there reaches every rank, so no rank waits for a peer that has stopped.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from aic_core.errors import AicError, SpecError

T = TypeVar("T")
TIMEOUT_ENV = "AIC_DIST_TIMEOUT"  # seconds a collective may wait for a peer before every rank gives up
DEFAULT_TIMEOUT = 600


class PeerFailed(AicError):
    """Another rank failed; it printed its own message, so this rank stops quietly with the same exit code."""

    def __init__(self, rank: int, exit_code: int = 2) -> None:
        super().__init__(f"rank {rank} failed (its message is above); this rank stopped too.")
        self.rank, self.exit_code = rank, exit_code


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is running (world size > 1)."""
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def once(self, fn: Callable[[], T], local: bool = False) -> T | None:
        """Run `fn` on rank 0 (with `local`, on each node's local rank 0) while the others wait; return its
        result there and None elsewhere. An error in `fn` is raised on that rank and a PeerFailed on the others."""
        runs_here = self.local_rank == 0 if local else self.is_main
        result, error = None, None
        if runs_here:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - every rank must hear of it, whatever it is
                error = exc
        self.agree(error)
        return result

    def each(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails on any, every rank stops (the failing one with its message)."""
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001
            error = exc
        self.agree(error)
        return result

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it failed. If any did, the lowest failing rank re-raises its error (and prints it)
        and every other rank raises PeerFailed, so one message is shown and every rank stops."""
        if self.active:
            failed = torch.tensor([self.rank if error is not None else self.world_size], device=self.collective_device)
            torch_dist.all_reduce(failed, op=torch_dist.ReduceOp.MIN)
            first = int(failed.item())
            if first < self.world_size and first != self.rank:
                raise PeerFailed(first)
        if error is not None:
            raise error

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (a copy; the tensor itself is left as it is)."""
        if not self.active:
            return value
        out = value.detach().clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    @property
    def collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def launcher_world() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from the launcher's environment; (0, 1, 0, 1) alone."""

    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise SpecError(
                f"{name}={value!r} in the environment is not a number; it is set by torchrun or deepspeed. "
                "Unset it to run as one process."
            ) from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank if world > 1 else 0)
    local_world = read("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise SpecError(
            f"RANK={rank}, WORLD_SIZE={world} in the environment do not describe a process of a group; "
            "launch with torchrun or deepspeed, or unset them."
        )
    return rank, world, local_rank, local_world


def setup(device: torch.device, world: tuple[int, int, int, int] | None = None) -> Dist:
    """The process group for this launch (none for one process). `device` is the trainer's device for this
    process (cuda:LOCAL_RANK under a launcher): NCCL for CUDA, gloo otherwise."""
    rank, world_size, local_rank, local_world = world or launcher_world()
    if world_size == 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return Dist(rank, world_size, local_rank, local_world, device)


def teardown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
