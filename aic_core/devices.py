"""Device names, read in one place: `auto`, `cpu`, `cuda` and `cuda:N`, as a trainer's `device` option, `aic plan
--device` and `aic generate --device` take them. torch is imported only when a name is resolved."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aic_core.errors import AicError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # for an option's Field(pattern=...): the names resolve_device reads
DEVICE_NAMES = "auto (CUDA if there is a GPU, else the CPU), cpu, cuda or cuda:N"


def is_device_name(name: object) -> bool:
    return isinstance(name, str) and re.fullmatch(DEVICE_PATTERN, name) is not None


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """The device `name` means for this process: "auto" is the GPU of LOCAL_RANK when there is CUDA, else the CPU;
    "cuda" is the GPU of LOCAL_RANK; "cpu" and "cuda:N" are themselves. Any other name raises ValueError."""
    import torch

    name = str(name)
    if not is_device_name(name):
        raise ValueError(f"unknown device {name!r}; use {DEVICE_NAMES}")
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def device_named(name: str, where: str) -> torch.device:
    """`resolve_device` for a name a user gave (`where`: the option or flag): an AicError that says what to give
    instead for a name that is not a device, or a CUDA device this machine does not have."""
    import torch

    try:
        device = resolve_device(name)
    except ValueError:
        raise AicError(f"{where}: unknown device {name!r}. Use {DEVICE_NAMES}.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"this machine has {count} CUDA device(s)" if count else "no CUDA GPU is available here"
            raise AicError(f"{where}: {name} was asked for, but {have}. Use cpu (or auto).")
    return device
