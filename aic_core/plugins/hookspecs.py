"""Hook specifications: one hook per plugin kind.

A plugin module implements the hooks it needs and is listed under the entry-point group `aic`:

    from aic_core.plugins.hookspecs import hookimpl

    @hookimpl
    def aic_register_models(register):
        register(MyModel)
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from aic_core.plugins import KIND_HOOKS

PROJECT = "aic"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def aic_register_models(register: Register) -> None:
    """Register model plugin classes (subclasses of aic_core.kinds.ModelPlugin)."""


@hookspec
def aic_register_positional_encodings(register: Register) -> None:
    """Register positional-encoding plugin classes (subclasses of aic_core.kinds.PositionalPlugin)."""


@hookspec
def aic_register_adapters(register: Register) -> None:
    """Register adapter plugin classes (subclasses of aic_core.kinds.AdapterPlugin)."""


@hookspec
def aic_register_tokenizers(register: Register) -> None:
    """Register tokenizer plugin classes (subclasses of aic_core.kinds.TokenizerPlugin)."""


@hookspec
def aic_register_trainers(register: Register) -> None:
    """Register trainer plugin classes (subclasses of aic_core.kinds.TrainerPlugin)."""


HOOK_FOR_KIND = KIND_HOOKS  # {kind: the hook above that registers it}
