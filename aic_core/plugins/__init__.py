"""The plugin system: the hook specifications (`hookspecs`), the five kinds' interfaces (`kinds`) and the registry
that loads plugins from entry points (`registry`). Plugin authors import `aic_core.hookspecs` and `aic_core.kinds`."""
