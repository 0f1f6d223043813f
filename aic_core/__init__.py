"""aic: a small typed core for building, training and running decoder-only transformers.

The folders follow the pipeline: spec -> plan -> data -> model -> train -> generate (see docs/architecture.md).
Plugin authors import a few stable paths, which stay where they were when the core was a flat folder:
`aic_core.kinds`, `aic_core.hookspecs`, `aic_core.testing`, `aic_core.nn` (and `aic_core.training`,
`aic_core.checkpoint`, `aic_core.distributed`, which packages made by earlier `aic new-plugin` import). Each is the
very module object of its new home (not a copy), so classes compare equal whichever path imported them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

PUBLIC_PATHS = {
    "aic_core.kinds": "aic_core.plugins.kinds",
    "aic_core.hookspecs": "aic_core.plugins.hookspecs",
    "aic_core.testing": "aic_core.authoring.testing",
    "aic_core.nn": "aic_core.model.nn",
    "aic_core.training": "aic_core.train.common",
    "aic_core.checkpoint": "aic_core.train.checkpoint",
    "aic_core.distributed": "aic_core.train.distributed",
}


class _PublicPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `aic_core.kinds` (and the other public paths, submodules included) as the module at its new home."""

    @staticmethod
    def _target(name: str) -> str | None:
        for old, new in PUBLIC_PATHS.items():
            if name == old or name.startswith(old + "."):
                return new + name[len(old) :]
        return None

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        new = self._target(name)
        return importlib.util.spec_from_loader(name, self) if new is not None else None

    def create_module(self, spec):  # noqa: ANN001
        return importlib.import_module(self._target(spec.name))

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass  # already executed under its own name


if not any(isinstance(f, _PublicPaths) for f in sys.meta_path):
    sys.meta_path.insert(0, _PublicPaths())
