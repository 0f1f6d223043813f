"""The plugin system: the hook specifications (`hookspecs`), the five kinds' interfaces (`kinds`) and the registry
that loads plugins from entry points (`registry`). Plugin authors import `aic_core.hookspecs` and `aic_core.kinds`."""

# The plugin kinds, in the order aic lists them, each with the hook that registers its plugins: the one list.
# kinds.BASES, hookspecs, the registry, the spec, the contract tests, the scaffold and the CLI take theirs from here
# (it imports nothing, so `aic --help` can name the kinds without loading the plugin system).
KIND_HOOKS = {
    "model": "aic_register_models",
    "positional": "aic_register_positional_encodings",
    "adapter": "aic_register_adapters",
    "tokenizer": "aic_register_tokenizers",
    "trainer": "aic_register_trainers",
}
KINDS: tuple[str, ...] = tuple(KIND_HOOKS)
