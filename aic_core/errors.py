"""One error family for everything a user can get wrong.

Every error says what was wrong, where (a JSON path or a file), and what to do.
The CLI prints the message as one paragraph and exits with code 2; no traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# What a missing optional extra is refused with, wherever it is found missing (the spec's check, the metrics log).
TENSORBOARD_MISSING = (
    "train.log_to: 'tensorboard' asks for TensorBoard logging, but the tensorboard package is not installed here. "
    'Install it with `pip install "aic[tensorboard]"`, or remove "tensorboard" from train.log_to (metrics.jsonl is '
    "always written)."
)


class AicError(Exception):
    """Base class: a problem the user can fix. `str(err)` is the whole message."""

    exit_code = 2


class SpecError(AicError):
    """The run spec is invalid (unknown key, wrong type, bad value, impossible combination)."""


class PluginError(AicError):
    """A plugin is unknown, failed to load, or cannot do what the spec asks."""


class DataError(AicError):
    """A data or tokenizer input is missing, empty or unusable."""


class CheckpointError(AicError):
    """A checkpoint or run directory is missing, corrupt, or does not match the spec."""


class Interrupted(AicError):
    """The user stopped the run (Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130


class GenerationError(AicError):
    """A generation request cannot be served (prompt too long, bad sampler value)."""


def describe(exc: BaseException) -> str:
    """An exception of someone else's code (a plugin, a library) in one line of a message: its type and its text,
    white space folded, at most 600 characters."""
    text = " ".join(str(exc).split())[:600]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    match = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
