"""Spec validation against a registry of the real gpt2 / learned plugins plus small fake ones."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from pydantic import Field

import aic_plugins.models.gpt2 as gpt2_module
import aic_plugins.positional.learned as learned_module
from aic_core.errors import SpecError
from aic_core.plugins.hookspecs import hookimpl
from aic_core.plugins.kinds import ModelPlugin, PluginOptions, PositionalPlugin, TokenizerPlugin, TrainerPlugin
from aic_core.plugins.registry import Registry
from aic_core.spec import json_schema, parse_spec

# --- fake plugins (second model and positional so the discriminated-union paths are exercised) ----


class FakeTokenizer(TokenizerPlugin):
    name = "faketok"

    class Options(PluginOptions):
        vocab_size: int = Field(256, gt=1, description="fake tokenizer vocabulary")

    def train(self, options, files, path): ...

    def load(self, options, path): ...


class FakeTrainer(TrainerPlugin):
    name = "torch"

    class Options(PluginOptions):
        device: str = "cpu"

    def check(self, options, spec):
        if options.device == "tpu":
            raise SpecError("train.trainer.device: 'tpu' is not supported by the fake trainer")

    def train(self, options, job): ...


class OtherModel(ModelPlugin):
    name = "othermodel"

    class Options(PluginOptions):
        width: int = 8

    def config(self, options, vocab_size): ...


class NoPositions(PositionalPlugin):
    name = "nopos"

    class Options(PluginOptions):
        scale: float = 1.0

    def build(self, options, config): ...


class EP:
    def __init__(self, name: str, module, dist: str = "aic") -> None:
        self.name, self.value, self.group, self._module = name, module.__name__, "aic", module
        self.dist = types.SimpleNamespace(metadata={"Name": dist}, version="0.0")

    def load(self):
        return self._module


def fake_module(name: str, hook: str, cls: type) -> types.ModuleType:
    mod = types.ModuleType(name)

    @hookimpl
    def register(register):
        register(cls)

    setattr(mod, hook, register)
    return mod


def make_registry(with_trainer: bool = True) -> Registry:
    eps = [
        EP("gpt2", gpt2_module),
        EP("learned", learned_module),
        EP("faketok", fake_module("faketok", "aic_register_tokenizers", FakeTokenizer), "fake"),
        EP("othermodel", fake_module("othermodel", "aic_register_models", OtherModel), "fake"),
        EP("nopos", fake_module("nopos", "aic_register_positional_encodings", NoPositions), "fake"),
    ]
    if with_trainer:
        eps.append(EP("torch", fake_module("faketrainer", "aic_register_trainers", FakeTrainer), "fake"))
    registry = Registry(eps, strict=True)
    return registry


@pytest.fixture(scope="module")
def registry() -> Registry:
    return make_registry()


def minimal(**overrides) -> dict:
    spec = {
        "name": "t",
        "data": {"train": ["corpus.txt"]},
        "tokenizer": {"type": "faketok"},
        "model": {"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": {"steps": 3},
    }
    spec.update(overrides)
    return spec


def error_of(raw: dict, registry: Registry) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, registry, source="s.json")
    msg = str(info.value)
    assert msg.startswith("s.json: ")
    return msg


# --- tests ----------------------------------------------------------------------------------------


def test_minimal_spec_fills_defaults(registry):
    raw = minimal()
    spec = parse_spec(raw, registry)
    assert "positional" not in raw["model"] and "trainer" not in raw["train"]  # the caller's dict is untouched
    assert spec.model.type == "gpt2" and spec.model.positional.type == "learned"
    assert spec.train.trainer.type == "torch" and spec.train.trainer.device == "cpu"
    assert spec.tokenizer.vocab_size == 256
    assert (spec.model.n_layer, spec.model.n_head, spec.model.n_embd, spec.model.block_size) == (2, 2, 32, 16)
    assert spec.model.vocab_size is None and spec.model.tie_embeddings is True and spec.model.dropout == 0.0
    assert spec.train.batch_size == 8 and spec.train.lr == 3e-4 and spec.eval.batches == 20
    assert spec.generate.sampler.temperature == 0.8 and spec.adapter is None and spec.seed == 1337
    assert spec.run_dir == Path("runs/t")


def test_explicit_plugin_choices_are_kept(registry):
    raw = minimal()
    raw["model"]["positional"] = {"type": "nopos", "scale": 2.0}
    spec = parse_spec(raw, registry)
    assert spec.model.positional.type == "nopos" and spec.model.positional.scale == 2.0


def test_missing_trainer_default_names_torch_when_not_installed():
    msg = error_of(minimal(), make_registry(with_trainer=False))
    assert "train.trainer.type" in msg and "'torch'" in msg and "Installed trainer plugins: none" in msg


def test_misspelt_key_names_path_and_close_match(registry):
    raw = minimal()
    raw["model"]["n_heads"] = raw["model"].pop("n_head")
    msg = error_of(raw, registry)
    assert "model.n_heads: unknown key 'n_heads'" in msg
    assert "did you mean 'n_head'?" in msg


def test_misspelt_key_in_a_nested_plugin_section(registry):
    raw = minimal()
    raw["model"]["positional"] = {"type": "nopos", "scal": 2.0}
    msg = error_of(raw, registry)
    assert "model.positional.scal" in msg and "did you mean 'scale'?" in msg


def test_misspelt_top_level_key(registry):
    raw = minimal()
    raw["trian"] = raw.pop("train")
    msg = error_of(raw, registry)
    assert "trian: unknown key 'trian' (did you mean 'train'?)" in msg
    assert "train: required key is missing" in msg


def test_wrong_type_names_path_and_value(registry):
    raw = minimal(train={"steps": "many"})
    msg = error_of(raw, registry)
    assert "train.steps:" in msg and "'many'" in msg
    raw = minimal()
    raw["model"]["n_layer"] = "two"
    msg = error_of(raw, registry)
    assert "model.n_layer:" in msg and "'two'" in msg
    msg = error_of(minimal(data={"train": ["a.txt", 5]}), registry)
    assert "data.train[1]:" in msg and "(got 5)" in msg


def test_out_of_range_value(registry):
    msg = error_of(minimal(train={"steps": 0}), registry)
    assert "train.steps:" in msg and "greater than 0" in msg and "(got 0)" in msg


def test_unknown_plugin_type_lists_installed(registry):
    raw = minimal()
    raw["model"]["type"] = "gpt3"
    msg = error_of(raw, registry)
    assert "model.type: unknown model plugin 'gpt3' (did you mean 'gpt2'?)" in msg
    assert "Installed model plugins: 'gpt2', 'othermodel'" in msg
    msg = error_of(minimal(tokenizer={"type": "bpe"}), registry)
    assert "tokenizer.type" in msg and "'faketok'" in msg
    msg = error_of(minimal(tokenizer={"vocab_size": 5}), registry)
    assert "tokenizer.type is missing" in msg and "'faketok'" in msg


def test_preset_fills_the_shape(registry):
    spec = parse_spec(minimal(model={"type": "gpt2", "preset": "gpt2-small"}), registry)
    assert (spec.model.n_layer, spec.model.n_head, spec.model.n_embd, spec.model.block_size) == (12, 12, 768, 1024)
    spec = parse_spec(minimal(model={"type": "gpt2", "preset": "gpt2-medium", "n_layer": 2}), registry)
    assert (spec.model.n_layer, spec.model.n_head, spec.model.n_embd) == (2, 16, 1024)


def test_shape_without_preset_must_be_complete(registry):
    msg = error_of(minimal(model={"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32}), registry)
    assert "model:" in msg and "'block_size' is not set" in msg


def test_unknown_preset(registry):
    msg = error_of(minimal(model={"type": "gpt2", "preset": "gpt2-huge"}), registry)
    assert "model.preset:" in msg and "'gpt2-huge'" in msg


def test_n_embd_not_divisible_by_n_head(registry):
    raw = minimal()
    raw["model"].update(n_embd=30, n_head=4)
    msg = error_of(raw, registry)
    assert "model:" in msg and "n_embd (30)" in msg and "n_head (4)" in msg


def test_plugin_check_runs_and_can_be_skipped(registry):
    raw = minimal(train={"steps": 3, "trainer": {"type": "torch", "device": "tpu"}})
    with pytest.raises(SpecError, match="'tpu' is not supported"):
        parse_spec(raw, registry, source="s.json")
    assert parse_spec(raw, registry, check=False).train.trainer.device == "tpu"


def test_json_schema_contains_every_plugins_options(registry):
    schema = json_schema(registry)
    defs = schema["$defs"]
    properties = {name: d.get("properties", {}) for name, d in defs.items()}

    def fields_in_schema(plugin) -> bool:
        wanted = set(plugin.Options.model_fields)
        return any(wanted <= set(p) and p.get("type", {}).get("const") == plugin.name for p in properties.values())

    for kind in ("model", "positional", "tokenizer", "trainer"):
        for plugin in registry.plugins(kind).values():
            assert fields_in_schema(plugin), f"{kind} plugin {plugin.name} missing from the schema"
    gpt2 = next(p for p in properties.values() if p.get("type", {}).get("const") == "gpt2")
    assert "n_head" in gpt2 and gpt2["n_head"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert "fake tokenizer vocabulary" in str(schema)
    assert set(schema["required"]) >= {"name", "data", "tokenizer", "model", "train"}


def test_data_paths_are_resolved_relative_to_base_dir(registry, tmp_path):
    absolute = str(tmp_path / "elsewhere" / "abs.txt")
    raw = minimal(data={"train": ["a.txt", "sub/../b.txt", absolute], "val": ["v.txt"]})
    spec = parse_spec(raw, registry, base_dir=tmp_path / "specs")
    assert spec.data.train == [
        str((tmp_path / "specs" / "a.txt").resolve()),
        str((tmp_path / "specs" / "b.txt").resolve()),
        str(Path(absolute).resolve()),
    ]
    assert spec.data.val == [str((tmp_path / "specs" / "v.txt").resolve())]
    assert parse_spec(raw, registry).data.train[0] == "a.txt"  # no base_dir: left as written


def test_not_an_object(registry):
    with pytest.raises(SpecError, match="must be a JSON object, got list"):
        parse_spec([1], registry, source="s.json")
