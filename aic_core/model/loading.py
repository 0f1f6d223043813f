"""Loading, in one place: open a model source and build a model from a spec (+ weights, + adapter).

A *model source* is anything `model.init_from`, `aic generate` and `aic export` can start from: an aic run
directory, one of its checkpoints, a folder written by `aic import hf`, or a Hugging Face model folder
(config.json + model.safetensors). `open_source` reads its model section, tokenizer section and tokenizer
file without building anything; `source.weights(config)` gives the tensors under aic's names.

For HF folders, the model plugin whose `hf_architectures` lists the folder's architecture maps the config
to its options and the tensors to aic names. Writing other formats (HF export, PEFT, merge) is convert.py's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from aic_core.errors import CheckpointError, PluginError, SpecError
from aic_core.files import file_sha256
from aic_core.model.nn.transformer import Transformer, TransformerConfig
from aic_core.plugins.kinds import ModelPlugin, Plugin, PluginOptions, Tokenizer, TokenizerPlugin
from aic_core.plugins.registry import SECTION_KEYS, Registry, get_registry
from aic_core.spec import ModelSpec, RunSpec, load_spec_file, parse_spec, spec_from_resolved
from aic_core.train.checkpoint import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    STATE,
    Checkpoint,
    find_checkpoint,
    load_weights,
    open_checkpoint,
    tensors_sha256,
    verified,
)

HF_CONFIG = "config.json"


# --- reading Hugging Face folders --------------------------------------------------------------------


def is_hf_folder(path: Path) -> bool:
    return (Path(path) / HF_CONFIG).is_file() and not (Path(path) / STATE).is_file()


def read_hf_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    config_path = folder / HF_CONFIG
    if not folder.exists():
        raise CheckpointError(
            f"{folder}: no such folder. Pass a Hugging Face model folder (config.json + model.safetensors), e.g. "
            "one written by save_pretrained."
        )
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: is a file, not a folder. Pass the Hugging Face model folder that holds config.json "
            "and model.safetensors."
        )
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json; a Hugging Face model folder holds config.json and model.safetensors."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a Hugging Face config (a JSON object).")
    return config


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise CheckpointError(
            f"{folder}: no model.safetensors (or model-0000N-of-0000M.safetensors shards). "
            f"Save the model with save_pretrained(..., safe_serialization=True)."
        )
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(str(shard)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{shard}: corrupt safetensors file ({exc}).") from None
    return state


def hf_model_plugin(config: dict[str, Any], registry: Registry, where: str) -> ModelPlugin:
    architectures = config.get("architectures") or []
    for plugin in registry.plugins("model").values():
        if any(a in plugin.hf_architectures for a in architectures):
            return plugin
    supported = sorted(a for p in registry.plugins("model").values() for a in p.hf_architectures)
    raise PluginError(
        f"{where}: architecture {architectures or 'unset'} is not supported. "
        f"Supported Hugging Face architectures: {', '.join(supported) or 'none'}."
    )


def _hf_options(plugin: Plugin, fields: dict[str, Any], what: str) -> PluginOptions:
    """A plugin's options from the fields an HF config maps to; `what` leads the error when they do not validate."""
    try:
        return plugin.Options(**fields)
    except ValidationError as exc:
        raise CheckpointError(
            f"{what} cannot be represented by aic's '{plugin.name}': {exc.errors()[0]['msg']}"
        ) from None


def hf_model_section(config: dict[str, Any], registry: Registry, where: str) -> tuple[ModelPlugin, dict[str, Any]]:
    """The spec's model section (with positional) for an HF config.json, validated by the plugins."""
    plugin = hf_model_plugin(config, registry, where)
    options = _hf_options(plugin, plugin.options_from_hf_config(config), f"{where}:")
    positional = dict(plugin.positional_from_hf_config(config))
    positional_plugin = registry.get("positional", positional.pop("type"))
    positional_options = _hf_options(positional_plugin, positional, f"{where}: positional settings")
    section = {
        "type": plugin.name,
        **options.model_dump(),
        "positional": {"type": positional_plugin.name, **positional_options.model_dump()},
    }
    return plugin, section


# Texts on which two readings of one tokenizer must agree (a folder's tokenizer files of two kinds), and on which an
# exported tokenizer must give aic's ids and text in transformers.AutoTokenizer: runs of spaces, tabs and newlines,
# leading and trailing spaces, CRLF, characters outside a small vocabulary, a "▁".
TOKENIZER_PROBES = (
    'Anne Elliot had been walking for an hour; "Captain Wentworth," she said, "is come."\n\n',
    "  two leading spaces, three   inside,\ttabs\t\tand one trailing \n\n\nafter blank lines\r\nCRLF",
    "é—… naïve “quoted” Straße 日本語 🦙 0123456789",
    "a literal ▁, ▁▁ twice, and at the end ▁",
)


@dataclass
class HFTokenizer:
    """The tokenizer of a Hugging Face model folder, as a tokenizer plugin reads it."""

    plugin: TokenizerPlugin
    section: dict[str, Any]  # the spec's tokenizer section: {"type": ..., options...}
    path: Path  # its one file: the folder's own, or what the plugin made of the folder's files
    files: list[str]  # the folder's files it was found by

    def load(self) -> Tokenizer:
        core = ("type", *SECTION_KEYS["tokenizer"])  # the section's own keys, not the plugin's options
        options = self.plugin.Options(**{k: v for k, v in self.section.items() if k not in core})
        return self.plugin.load(options, self.path)


_converted: Any = None  # a TemporaryDirectory for tokenizer files made from a folder's files, for this process


def _tokenizer_file(folder: Path, names: list[str], data: bytes) -> Path:
    """The folder's own file when `data` is it, else `data` written to this process's temporary folder."""
    for name in names:
        if (folder / name).read_bytes() == data:
            return folder / name
    global _converted
    if _converted is None:
        import tempfile

        _converted = tempfile.TemporaryDirectory(prefix="aic-hf-tokenizers-")
    import hashlib

    path = Path(_converted.name) / f"{hashlib.sha256(data).hexdigest()[:16]}.tokenizer"
    if not path.is_file():
        path.write_bytes(data)
    return path


def hf_chat_template(folder: Path) -> str | None:
    """An HF folder's chat template: chat_template.jinja (transformers 5 writes it there), else tokenizer_config.json's
    "chat_template" (a string, or a list of named templates: the one named "default")."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8") or None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return template if isinstance(template, str) and template else None


def hf_tokenizer(folder: Path, registry: Registry) -> HFTokenizer | None:
    """The tokenizer an HF folder carries, found by the tokenizer plugins' `hf_files` and read by their
    `from_hf_folder`; None when it holds none.

    A folder may hold the files of two kinds of tokenizer: Llama's ship tokenizer.model (SentencePiece) and the
    tokenizer.json transformers made of it, and aic's own exports do the same. Each is then loaded, and where they
    give the same ids and text on TOKENIZER_PROBES the one that is not tokenizer.json is taken (tokenizer.json is the
    format every other is converted to, so the other is the original); where they differ, the folder is refused."""
    folder = Path(folder)
    found = []
    for plugin in registry.plugins("tokenizer").values():
        names = [name for name in plugin.hf_files if (folder / name).is_file()]
        if names:
            options, data = plugin.from_hf_folder(folder)
            section = {"type": plugin.name, **options}
            if template := hf_chat_template(folder):
                section["chat_template"] = template
            found.append(HFTokenizer(plugin, section, _tokenizer_file(folder, names, data), names))
    if len(found) <= 1:
        return found[0] if found else None
    found.sort(key=lambda t: "tokenizer.json" in t.files)
    first, loaded = found[0], found[0].load()
    for other in found[1:]:
        theirs = other.load()
        for text in TOKENIZER_PROBES:
            ours_ids, their_ids = loaded.encode(text), theirs.encode(text)
            if (
                ours_ids != their_ids
                or loaded.vocab_size != theirs.vocab_size
                or loaded.decode(ours_ids) != theirs.decode(their_ids)
            ):
                raise CheckpointError(
                    f"{folder}: holds tokenizer files of two kinds that are not the same tokenizer: "
                    f"{', '.join(first.files)} (read by the {first.plugin.name} plugin, {loaded.vocab_size} tokens) "
                    f"and {', '.join(other.files)} ({other.plugin.name}, {theirs.vocab_size} tokens) give different "
                    f"ids for {text[:40]!r}. Remove the files of the tokenizer that is not the model's; nothing was "
                    "written."
                )
    return first


def hf_state_dict(plugin: ModelPlugin, folder: Path, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """The folder's tensors under aic's names; a mismatch names the HF tensors and the folder."""
    try:
        return plugin.state_dict_from_hf(read_hf_weights(folder), config)
    except PluginError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None


# --- model sources ------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    path: Path
    format: str  # "aic" (a run, checkpoint or imported folder) or "hf"
    model_section: dict[str, Any]  # {"type", fields..., "positional": {...}}
    tokenizer_section: dict[str, Any] | None
    tokenizer_path: Path | None
    vocab_size: int  # the model's vocabulary (not padded)
    _load: Callable[[TransformerConfig], dict[str, torch.Tensor]]

    def weights(self, config: TransformerConfig) -> dict[str, torch.Tensor]:
        """The source's tensors under aic's names, for a model of `config`."""
        return self._load(config)


def open_source(path: Path, registry: Registry | None = None) -> ModelSource:
    registry = registry or get_registry()
    path = Path(path)
    if is_hf_folder(path):
        config = read_hf_config(path)
        plugin, section = hf_model_section(config, registry, str(path / HF_CONFIG))
        tok = hf_tokenizer(path, registry)

        def load(model_config: TransformerConfig) -> dict[str, torch.Tensor]:
            return hf_state_dict(plugin, path, model_config)

        return ModelSource(
            path,
            "hf",
            section,
            tok.section if tok else None,
            tok.path if tok else None,
            section["vocab_size"],
            load,
        )
    ckpt = open_checkpoint(path)
    spec = ckpt.state["spec"]
    if spec.get("adapter"):
        raise CheckpointError(
            f"{ckpt.path}: holds a model with a '{spec['adapter']['type']}' adapter. "
            f"Merge it into its base first (`aic merge {path} OUT`) and use OUT; "
            f"or export the adapter alone with `aic export {path} --format peft OUT`."
        )
    has_tok = ckpt.tokenizer_path.is_file()
    return ModelSource(
        ckpt.path,
        "aic",
        spec["model"],
        spec.get("tokenizer") if has_tok else None,
        ckpt.tokenizer_path if has_tok else None,
        int(ckpt.state["model_config"]["vocab_size"]),
        lambda _config: ckpt.weights(),
    )


# --- building models ----------------------------------------------------------------------------------


def build_model(
    spec: ModelSpec, registry: Registry, vocab_size: int, init_weights: bool = False, source: ModelSource | None = None
) -> Transformer:
    """Model plugin + positional plugin (+ adapter) -> Transformer, weights freshly initialised or, with
    `init_weights` and a `model.init_from`, the source's (loaded before an adapter wraps the model). `source` is
    that `model.init_from` source when the caller has opened it already (`load_spec_with_source`)."""
    model_plugin = registry.get("model", spec.model.type)
    positional_plugin = registry.get("positional", spec.model.positional.type)
    config = model_plugin.config(spec.model, vocab_size)
    if config.vocab_size < vocab_size:
        raise SpecError(
            f"model.vocab_size: {config.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size}). "
            f"Remove model.vocab_size to use the tokenizer's, or set it to at least {vocab_size}."
        )
    positional = positional_plugin.build(spec.model.positional, config)
    model = model_plugin.build(spec.model, config, positional)
    if init_weights and spec.model.init_from:
        src = source or open_source(Path(spec.model.init_from), registry)
        load_weights(
            model,
            src.weights(config),
            str(src.path),
            "the spec's model (model.init_from: keys set in the spec's model section override the source's, "
            "and shapes must match its weights)",
        )
    if spec.adapter is not None:  # wraps target modules in place and freezes the base
        registry.get("adapter", spec.adapter.type).apply(model, spec.adapter)
    return model


def load_tokenizer(spec: ModelSpec, registry: Registry, path: Path) -> Tokenizer:
    return registry.get("tokenizer", spec.tokenizer.type).load(spec.tokenizer, path)


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    spec: ModelSpec  # a RunSpec for a trained checkpoint
    checkpoint: Checkpoint | None  # None for a Hugging Face folder


def load_checkpoint_model(
    path: Path,
    registry: Registry | None = None,
    device: torch.device | str = "cpu",
    checkpoint: Checkpoint | None = None,
) -> Loaded:
    """A run directory (its latest checkpoint), a checkpoint folder or a Hugging Face model folder -> model,
    tokenizer and spec. `checkpoint` is the checkpoint of `path` when the caller has opened it already."""
    registry = registry or get_registry()
    if checkpoint is None and is_hf_folder(Path(path)):
        return _load_hf_folder(Path(path), registry, device)
    ckpt = checkpoint or open_checkpoint(Path(path))
    spec = spec_from_resolved(ckpt.state["spec"], registry, source=str(ckpt.path / "state.json"))
    if not ckpt.has_tokenizer or spec.tokenizer is None:
        raise CheckpointError(
            f"{ckpt.path}: holds no tokenizer (it was imported from a folder without one), "
            "so it cannot turn text into tokens. Put the model's tokenizer file (for sentencepiece: tokenizer.model) "
            "in the Hugging Face folder and import it again."
        )
    actual = file_sha256(ckpt.tokenizer_path)
    if actual != ckpt.state["tokenizer_hash"]:
        raise CheckpointError(
            f"{ckpt.tokenizer_path}: this tokenizer (sha256 {actual[:12]}) is not the one the model was trained with "
            f"(sha256 {ckpt.state['tokenizer_hash'][:12]}); token ids would mean different things. "
            "Restore the checkpoint's own tokenizer.model."
        )
    tokenizer = load_tokenizer(spec, registry, ckpt.tokenizer_path)
    model = build_model(spec, registry, tokenizer.vocab_size)
    load_weights(model, ckpt.weights(), str(ckpt.path), "the model in its spec")
    return Loaded(model.to(device).eval(), tokenizer, spec, ckpt)


def _load_hf_folder(folder: Path, registry: Registry, device: torch.device | str) -> Loaded:
    """A Hugging Face model folder (config.json + model.safetensors + a tokenizer file a plugin reads)."""
    tok = hf_tokenizer(folder, registry)
    if tok is None:
        files = ", ".join(sorted({n for p in registry.plugins("tokenizer").values() for n in p.hf_files})) or "none"
        raise CheckpointError(
            f"{folder}: a Hugging Face model folder without a tokenizer file aic can read (looked for: {files}), "
            "so text cannot be turned into tokens. Put the model's tokenizer file in the folder."
        )
    imported = import_hf(folder, registry)
    spec = model_spec(imported.options, registry, str(folder / "config.json"), tok.section)
    tokenizer = load_tokenizer(spec, registry, tok.path)
    check_tokenizer_fits(tokenizer, imported.model.config.vocab_size, folder, tok)
    return Loaded(imported.model.to(device).eval(), tokenizer, spec, None)


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, folder: Path, tok: HFTokenizer) -> None:
    """A folder's tokenizer must not have more tokens than its model's vocabulary."""
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{folder / tok.files[0]}: this tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary ({vocab_size}, config.json's vocab_size); it is not the model's tokenizer. Put the model's "
            f"own tokenizer files in {folder}; nothing was written."
        )


@dataclass
class Imported:
    model: Transformer
    plugin: ModelPlugin
    options: dict[str, Any]  # the model section of a spec: {"type": ..., fields..., "positional": {...}}


def import_hf(folder: Path, registry: Registry | None = None) -> Imported:
    """Build an aic model from a Hugging Face folder, with every tensor accounted for."""
    registry = registry or get_registry()
    folder = Path(folder)
    config = read_hf_config(folder)
    plugin, section = hf_model_section(config, registry, str(folder / HF_CONFIG))
    model = build_from_section(section, registry, source=str(folder / HF_CONFIG))
    state = hf_state_dict(plugin, folder, model.config)
    load_weights(model, state, str(folder), f"a {plugin.name} model of this config.json")
    return Imported(model.eval(), plugin, section)


def model_spec(
    section: dict[str, Any], registry: Registry, source: str, tokenizer: dict[str, Any] | None = None
) -> Any:
    """A model section (and tokenizer section) validated into a model-only spec, as in a RunSpec."""
    raw: dict[str, Any] = {"name": "model", "model": section}
    if tokenizer is not None:
        raw["tokenizer"] = tokenizer
    return parse_spec(raw, registry, source=source, model_only=True, check=False)


def build_from_section(
    section: dict[str, Any], registry: Registry, vocab_size: int = 0, source: str = "model section"
) -> Transformer:
    """A model with fresh weights from a model section (vocab_size: when the section leaves it unset)."""
    return build_model(model_spec(section, registry, source), registry, section.get("vocab_size") or vocab_size)


def load_adapter(model: Transformer, folder: Path, registry: Registry | None = None) -> list[str]:
    """Put an adapter saved in `folder` (adapter.json + adapter.safetensors, as every checkpoint of an adapter
    run holds) onto `model`, a plain base; refuse it if it was trained on another base."""
    registry = registry or get_registry()
    folder = find_checkpoint(Path(folder)) if not (Path(folder) / ADAPTER_META).is_file() else Path(folder)
    meta_path, weights_path = folder / ADAPTER_META, folder / ADAPTER_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{folder}: no {ADAPTER_META} and {ADAPTER_WEIGHTS}; pass a checkpoint of a run trained with an adapter."
        )
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(verified(folder, ADAPTER_WEIGHTS)))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"{folder}: damaged adapter files ({exc}).") from None
    base_hash = tensors_sha256(model.state_dict())
    if base_hash != meta.get("base_sha256"):
        raise CheckpointError(
            f"{folder}: this adapter was trained on another base model (base sha256 "
            f"{str(meta.get('base_sha256'))[:12]}, trained from {meta.get('base') or 'an unrecorded source'}); "
            f"the model given has sha256 {base_hash[:12]}. An adapter only fits the exact weights it was trained on: "
            "load it onto its own base."
        )
    options = dict(meta["adapter"])
    plugin = registry.get("adapter", options.pop("type"))
    plugin.apply(model, plugin.Options(**options))
    expected = set(plugin.adapter_state(model))
    if expected != set(tensors):
        raise CheckpointError(
            f"{folder / ADAPTER_WEIGHTS}: its tensors do not match the adapter in {ADAPTER_META} (missing: "
            f"{', '.join(sorted(expected - set(tensors))[:6]) or 'none'}; unexpected: "
            f"{', '.join(sorted(set(tensors) - expected)[:6]) or 'none'})."
        )
    model.load_state_dict(tensors, strict=False)
    return sorted(expected)


# --- specs whose model.init_from names a source ------------------------------------------------------------


def load_spec(path: str | Path, registry: Registry) -> RunSpec:
    """A spec file, validated, with a `model.init_from` source's model and tokenizer sections filled in."""
    return load_spec_with_source(path, registry)[0]


def load_spec_with_source(path: str | Path, registry: Registry) -> tuple[RunSpec, ModelSource | None]:
    """`load_spec`, and the `model.init_from` source it opened (None without one), so that a run reads the
    source once: its sections here, its weights when the model is built, its tokenizer in the tokenizer stage."""
    opened: list[ModelSource] = []

    def opener(source: Path, reg: Registry) -> ModelSource:
        opened.append(open_source(source, reg))
        return opened[-1]

    spec = load_spec_file(path, registry, open_source=opener)
    return spec, (opened[-1] if opened else None)
