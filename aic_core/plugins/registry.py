"""Plugin discovery: load each entry point of group `aic` on its own, collect plugin classes per kind.

A plugin that fails (import error, hook error, invalid class, duplicate name) is recorded and skipped,
so one broken package never stops `aic`; with strict mode (`--strict`, AIC_STRICT_PLUGINS=1) the first
failure is fatal. AIC_PLUGINS=dist1,dist2 pins which third-party distributions load; the built-ins
(distribution `aic`) always load.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel

from aic_core.errors import PluginError, describe, did_you_mean
from aic_core.plugins import hookspecs
from aic_core.plugins.kinds import BASES, KINDS, Plugin

ENTRY_POINT_GROUP = "aic"
BUILTIN_DISTRIBUTION = "aic"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
# Keys a plugin section holds besides the plugin's options (aic_core.spec.ModelSection, TokenizerSection):
# options may not reuse them.
SECTION_KEYS = {"model": ("positional", "init_from"), "tokenizer": ("sample_bytes", "chat_template")}


@dataclass
class PluginRecord:
    """One line of `aic plugins`."""

    name: str
    kind: str  # one of KINDS, or "-" when the entry point failed before registering anything
    distribution: str
    version: str
    source: str  # the entry point, "name = module"
    status: str  # ok | error | conflict | skipped
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _pinned_from_env() -> set[str] | None:
    value = os.environ.get("AIC_PLUGINS")
    if value is None:
        return None
    return {_normalise(d) for d in value.split(",") if d.strip()}


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist.strip()).lower()


class Registry:
    def __init__(
        self,
        entry_points: Iterable[Any] | None = None,
        *,
        strict: bool | None = None,
        pinned: Iterable[str] | None = None,
    ) -> None:
        self.strict = _truthy(os.environ.get("AIC_STRICT_PLUGINS")) if strict is None else strict
        self.pinned = _pinned_from_env() if pinned is None else {_normalise(d) for d in pinned}
        self.records: list[PluginRecord] = []
        self._plugins: dict[str, dict[str, Plugin]] = {kind: {} for kind in KINDS}
        self._dist_versions: dict[str, str] = {}
        if entry_points is None:
            entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        # Built-ins first, so a third-party plugin can never silently replace one.
        eps = sorted(entry_points, key=lambda ep: (self._dist_of(ep)[0] != BUILTIN_DISTRIBUTION, ep.name))
        for ep in eps:
            self._load(ep)

    # --- loading ------------------------------------------------------------------------------

    @staticmethod
    def _dist_of(ep: Any) -> tuple[str, str]:
        dist = getattr(ep, "dist", None)
        if dist is None:
            return "unknown", "unknown"
        return dist.metadata["Name"] or "unknown", dist.version or "unknown"

    def _record(self, record: PluginRecord) -> None:
        self.records.append(record)
        if record.status == "error":
            if self.strict:
                raise PluginError(
                    f"plugin '{record.name}' from {record.distribution} {record.version} ({record.source}) "
                    f"failed: {record.error}. Strict plugin loading is on (--strict or AIC_STRICT_PLUGINS=1); "
                    f"fix or uninstall the plugin, or turn strict mode off to skip it."
                )
        elif record.status == "conflict":
            warnings.warn(f"aic plugin conflict: {record.error}", stacklevel=3)
            if self.strict:
                raise PluginError(f"plugin conflict: {record.error}. Strict plugin loading is on.")

    def _load(self, ep: Any) -> None:
        dist, version = self._dist_of(ep)
        source = f"{ep.name} = {ep.value}"

        def record(status: str, error: str | None = None, name: str | None = None, kind: str = "-") -> None:
            self._record(PluginRecord(name or ep.name, kind, dist, version, source, status, error))

        if self.pinned is not None and dist != BUILTIN_DISTRIBUTION and _normalise(dist) not in self.pinned:
            record("skipped", f"distribution '{dist}' is not listed in AIC_PLUGINS")
            return
        try:
            module = ep.load()
        except (Exception, SystemExit) as exc:  # a broken plugin must not take aic down, not even with sys.exit()
            record("error", f"import failed: {describe(exc)}")
            return

        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(module, name=ep.name)
        except Exception as exc:
            record("error", f"invalid hook implementation: {describe(exc)}")
            return

        registered = 0
        for kind, hook_name in hookspecs.HOOK_FOR_KIND.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                classes: list[type] = []
                try:
                    impl.function(register=classes.append)
                except Exception as exc:
                    record("error", f"hook {hook_name} raised {describe(exc)}")
                    continue
                for cls in classes:
                    registered += 1
                    self._add(kind, cls, dist, version, source)
        if registered == 0 and not any(r.source == source for r in self.records):
            record("error", "registered no plugins: implement one of the aic_register_* hooks with @hookimpl")
        self._dist_versions[dist] = version

    def _add(self, kind: str, cls: type, dist: str, version: str, source: str) -> None:
        name = getattr(cls, "name", None)
        shown = name if isinstance(name, str) and name else getattr(cls, "__name__", repr(cls))

        def record(status: str, error: str | None = None) -> None:
            self._record(PluginRecord(shown, kind, dist, version, source, status, error))

        problem = self._invalid(kind, cls)
        if problem:
            record("error", problem)
            return
        existing = self._plugins[kind].get(name)
        if existing is not None:
            owner = next(r for r in self.records if r.kind == kind and r.name == name and r.status == "ok")
            record(
                "conflict",
                f"{kind} plugin '{name}' from {dist} ({source}) has the same name as the one from "
                f"{owner.distribution} ({owner.source}); the one loaded first ({owner.distribution}) is used. "
                f"Rename one of them or uninstall one distribution.",
            )
            return
        try:
            instance = cls()
        except Exception as exc:
            record("error", f"could not be created: {describe(exc)}")
            return
        self._plugins[kind][name] = instance
        record("ok")

    @staticmethod
    def _invalid(kind: str, cls: Any) -> str | None:
        base = BASES[kind]
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            return f"registered {cls!r}, which is not a subclass of aic_core.kinds.{base.__name__}"
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            return f"class {cls.__name__} needs a `name` of lower-case letters, digits, '_', '-', '.' (got {name!r})"
        options = getattr(cls, "Options", None)
        if not (inspect.isclass(options) and issubclass(options, BaseModel)):
            return (
                f"{cls.__name__}.Options must be a Pydantic model (subclass aic_core.kinds.PluginOptions); "
                f"got {options!r}"
            )
        if options.model_config.get("extra") != "forbid":
            return (
                f"{cls.__name__}.Options must forbid unknown keys "
                f"(model_config extra='forbid'; subclass aic_core.kinds.PluginOptions)"
            )
        if "type" in options.model_fields:
            return f"{cls.__name__}.Options must not define a field named 'type': the spec uses it to pick the plugin"
        taken = [f for f in SECTION_KEYS.get(kind, ()) if f in options.model_fields]
        if taken:
            names = ", ".join(repr(f) for f in taken)
            return f"{cls.__name__}.Options must not define {names}: the spec's {kind} section uses these keys itself"
        try:
            options.model_json_schema()
        except Exception as exc:
            return f"{cls.__name__}.Options is not a valid Pydantic model: {describe(exc)}"
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            return f"class {cls.__name__} does not implement: {missing}"
        missing = cls.unimplemented()
        if missing:
            return f"class {cls.__name__} does not implement: {missing}"
        return None

    # --- lookup -------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[kind])

    def plugins(self, kind: str) -> dict[str, Plugin]:
        return dict(self._plugins[kind])

    def get(self, kind: str, name: str, where: str | None = None) -> Plugin:
        plugin = self._plugins[kind].get(name)
        if plugin is None:
            installed = ", ".join(f"'{n}'" for n in self.names(kind)) or "none"
            at = f"{where}: " if where else ""
            raise PluginError(
                f"{at}unknown {kind} plugin '{name}'{did_you_mean(name, self.names(kind))}. Installed {kind} plugins: "
                f"{installed}. Run `aic plugins` to see all plugins and any that failed to load."
            )
        return plugin

    def version_of(self, plugin: Plugin) -> str:
        for record in self.records:
            if record.kind == plugin.kind and record.name == plugin.name and record.status == "ok":
                return f"{record.distribution} {record.version}"
        return "unknown"


_default: Registry | None = None


def get_registry(strict: bool | None = None) -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None or (strict is not None and strict != _default.strict):
        _default = Registry(strict=strict)
    return _default
