"""Hugging Face interop: read a transformers model folder (config.json + safetensors) into an aic model.

The model plugin whose `hf_architectures` lists the folder's architecture maps the config to its options
and the tensors to aic names; the core reads the files, builds the model and checks every tensor is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from aic_core.checkpoint import load_weights
from aic_core.errors import CheckpointError, PluginError
from aic_core.kinds import ModelPlugin
from aic_core.nn.transformer import Transformer
from aic_core.registry import Registry, get_registry


@dataclass
class Imported:
    model: Transformer
    plugin: ModelPlugin
    options: dict[str, Any]  # the model section of a spec: {"type": ..., fields..., "positional": {...}}


def read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; a Hugging Face model folder holds config.json and model.safetensors.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc.msg}).") from None
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: no model.safetensors (or model-0000N-of-0000M.safetensors shards). Save the model with safe_serialization=True.")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(str(shard)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{shard}: corrupt safetensors file ({exc}).") from None
    return config, state


def import_hf(folder: Path, registry: Registry | None = None) -> Imported:
    """Build an aic model from a Hugging Face folder, with every tensor accounted for."""
    registry = registry or get_registry()
    config, hf_state = read_hf_folder(folder)
    architectures = config.get("architectures") or []
    for plugin in registry.plugins("model").values():
        if any(a in plugin.hf_architectures for a in architectures):
            break
    else:
        supported = sorted(a for p in registry.plugins("model").values() for a in p.hf_architectures)
        raise PluginError(
            f"{folder}/config.json: architecture {architectures or 'unset'} is not supported. "
            f"Supported Hugging Face architectures: {', '.join(supported) or 'none'}."
        )
    fields = plugin.options_from_hf_config(config)
    try:
        options = plugin.Options(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"{folder}/config.json: cannot be represented by aic's '{plugin.name}': {exc.errors()[0]['msg']}") from None
    model_config = plugin.config(options, fields.get("vocab_size", 0))
    positional_section = dict(plugin.positional_from_hf_config(config))
    positional_plugin = registry.get("positional", positional_section.pop("type"))
    try:
        positional_options = positional_plugin.Options(**positional_section)
    except ValidationError as exc:
        raise CheckpointError(f"{folder}/config.json: positional settings cannot be represented by aic's '{positional_plugin.name}': {exc.errors()[0]['msg']}") from None
    model = plugin.build(options, model_config, positional_plugin.build(positional_options, model_config))
    state = plugin.state_dict_from_hf(hf_state, model_config)
    load_weights(model, state, str(folder), f"a {plugin.name} model of this config.json")
    section = {"type": plugin.name, **options.model_dump(), "positional": {"type": positional_plugin.name, **positional_options.model_dump()}}
    return Imported(model.eval(), plugin, section)
