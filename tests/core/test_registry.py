"""The registry's guarantees, with fake entry points and in-memory plugin modules (nothing installed)."""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from aic_core.errors import PluginError
from aic_core.plugins.hookspecs import hookimpl
from aic_core.plugins.kinds import ModelPlugin, PluginOptions, TokenizerPlugin
from aic_core.plugins.registry import Registry

# --- fakes ----------------------------------------------------------------------------------------


@dataclass
class FakeDist:
    name: str
    version: str = "1.0"

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


@dataclass
class FakeEntryPoint:
    name: str
    module: Any  # a module, or an exception raised by load()
    dist_name: str = "aic"
    group: str = "aic"
    dist: FakeDist = field(init=False)

    def __post_init__(self) -> None:
        self.dist = FakeDist(self.dist_name)

    @property
    def value(self) -> str:
        return f"fake_{self.name}"

    def load(self) -> Any:
        if isinstance(self.module, BaseException):
            raise self.module
        return self.module


def model_class(plugin_name: str, options: Any = PluginOptions) -> type[ModelPlugin]:
    def config(self, options, vocab_size):  # never called here
        raise NotImplementedError

    return type(
        f"Model_{plugin_name.replace('-', '_')}",
        (ModelPlugin,),
        {"name": plugin_name, "Options": options, "config": config},
    )


def module_registering(*classes: type, hook: str = "aic_register_models") -> types.ModuleType:
    mod = types.ModuleType(f"fake_{hook}_{len(classes)}")

    @hookimpl
    def register_all(register):
        for cls in classes:
            register(cls)

    setattr(mod, hook, register_all)
    return mod


def ep(name: str, *classes: type, dist: str = "aic") -> FakeEntryPoint:
    return FakeEntryPoint(name, module_registering(*classes), dist)


def status_of(registry: Registry, name: str) -> list[str]:
    return [r.status for r in registry.records if r.name == name]


def record(registry: Registry, name: str):
    (rec,) = [r for r in registry.records if r.name == name]
    return rec


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("AIC_PLUGINS", raising=False)
    monkeypatch.delenv("AIC_STRICT_PLUGINS", raising=False)


# --- tests ----------------------------------------------------------------------------------------


def test_good_plugins_load_and_are_recorded():
    reg = Registry([ep("one", model_class("alpha")), ep("two", model_class("beta"), dist="acme-plugins")], strict=False)
    assert reg.names("model") == ["alpha", "beta"]
    assert isinstance(reg.get("model", "alpha"), ModelPlugin)
    beta = record(reg, "beta")
    assert (beta.kind, beta.distribution, beta.version, beta.status, beta.source) == (
        "model",
        "acme-plugins",
        "1.0",
        "ok",
        "two = fake_two",
    )


def test_import_error_is_recorded_and_others_still_load():
    broken = FakeEntryPoint("broken", ImportError("No module named 'missing_dep'"), "acme")
    reg = Registry([broken, ep("good", model_class("alpha"))], strict=False)
    rec = record(reg, "broken")
    assert rec.status == "error" and rec.kind == "-"
    assert "import failed" in rec.error and "missing_dep" in rec.error
    assert reg.names("model") == ["alpha"]


def test_hook_that_raises_is_recorded():
    mod = types.ModuleType("raising")

    @hookimpl
    def aic_register_models(register):
        raise RuntimeError("boom in hook")

    mod.aic_register_models = aic_register_models
    reg = Registry([FakeEntryPoint("raising", mod, "acme"), ep("good", model_class("alpha"))], strict=False)
    rec = record(reg, "raising")
    assert rec.status == "error"
    assert "aic_register_models" in rec.error and "RuntimeError: boom in hook" in rec.error
    assert reg.names("model") == ["alpha"]


def test_hook_with_a_wrong_signature_is_recorded():
    mod = types.ModuleType("badsig")

    @hookimpl
    def aic_register_models(reg, extra):
        pass

    mod.aic_register_models = aic_register_models
    reg = Registry([FakeEntryPoint("badsig", mod, "acme")], strict=False)
    assert "invalid hook implementation" in record(reg, "badsig").error


def test_module_without_hooks_is_an_error():
    reg = Registry([FakeEntryPoint("empty", types.ModuleType("empty"), "acme")], strict=False)
    rec = record(reg, "empty")
    assert rec.status == "error" and "registered no plugins" in rec.error


def test_class_of_the_wrong_kind_is_refused():
    class Tok(TokenizerPlugin):
        name = "tok"

        def train(self, options, files, path): ...

        def load(self, options, path): ...

    # A tokenizer registered through the *model* hook is not a ModelPlugin.
    reg = Registry([ep("wrong", Tok), ep("good", model_class("alpha"))], strict=False)
    rec = record(reg, "tok")
    assert rec.status == "error" and rec.kind == "model"
    assert "not a subclass of aic_core.kinds.ModelPlugin" in rec.error
    assert reg.names("model") == ["alpha"]


def test_not_a_class_is_refused():
    reg = Registry([ep("obj", object())], strict=False)
    (rec,) = reg.records
    assert rec.status == "error" and "not a subclass" in rec.error


def test_options_that_are_not_pydantic_are_refused():
    class PlainOptions:
        n_layer: int = 2

    reg = Registry([ep("plain", model_class("plain", PlainOptions))], strict=False)
    rec = record(reg, "plain")
    assert rec.status == "error" and "Options must be a Pydantic model" in rec.error
    assert reg.names("model") == []


def test_options_allowing_extra_keys_are_refused():
    class Loose(BaseModel):
        model_config = ConfigDict(extra="allow")

    class LooseSub(PluginOptions):
        model_config = ConfigDict(extra="ignore")

    reg = Registry([ep("loose", model_class("loose", Loose), model_class("loose2", LooseSub))], strict=False)
    for name in ("loose", "loose2"):
        rec = record(reg, name)
        assert rec.status == "error" and "must forbid unknown keys" in rec.error
    assert reg.names("model") == []


def test_options_with_a_type_field_and_a_bad_name_are_refused():
    class Typed(PluginOptions):
        type: str = "x"

    reg = Registry([ep("typed", model_class("typed", Typed), model_class("Bad Name"))], strict=False)
    assert "field named 'type'" in record(reg, "typed").error
    assert "needs a `name`" in record(reg, "Bad Name").error


def test_abstract_class_is_refused():
    Abstract = type("Abstract", (ModelPlugin,), {"name": "abstract"})  # no config()
    reg = Registry([ep("abstract", Abstract)], strict=False)
    assert "does not implement: config" in record(reg, "abstract").error


def test_duplicate_name_builtin_wins_with_a_warning():
    builtin_cls, third_cls = model_class("gpt2"), model_class("gpt2")
    # The third-party entry point sorts first by name; the built-in must still win.
    eps = [ep("aaa-third", third_cls, dist="acme"), ep("zzz-builtin", builtin_cls, dist="aic")]
    with pytest.warns(UserWarning, match="conflict.*gpt2.*acme"):
        reg = Registry(eps, strict=False)
    assert type(reg.get("model", "gpt2")) is builtin_cls
    statuses = {(r.distribution, r.status) for r in reg.records if r.name == "gpt2"}
    assert statuses == {("aic", "ok"), ("acme", "conflict")}
    conflict = next(r for r in reg.records if r.status == "conflict")
    assert "aaa-third = fake_aaa-third" in conflict.error and "zzz-builtin = fake_zzz-builtin" in conflict.error
    assert reg.version_of(reg.get("model", "gpt2")) == "aic 1.0"


def test_same_name_in_different_kinds_is_no_conflict():
    class Tok(TokenizerPlugin):
        name = "alpha"

        def train(self, options, files, path): ...

        def load(self, options, path): ...

    eps = [ep("m", model_class("alpha")), FakeEntryPoint("t", module_registering(Tok, hook="aic_register_tokenizers"))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = Registry(eps, strict=False)
    assert reg.names("model") == ["alpha"] and reg.names("tokenizer") == ["alpha"]


def test_strict_mode_makes_the_first_failure_fatal():
    eps = [FakeEntryPoint("broken", ImportError("nope"), "acme"), ep("good", model_class("alpha"))]
    with pytest.raises(PluginError, match=r"plugin 'broken' from acme 1\.0.*import failed.*Strict"):
        Registry(eps, strict=True)


def test_strict_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("AIC_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="Options must be a Pydantic model"):
        Registry([ep("plain", model_class("plain", dict))])
    monkeypatch.setenv("AIC_STRICT_PLUGINS", "0")
    assert Registry([ep("plain", model_class("plain", dict))]).names("model") == []


def test_strict_mode_makes_a_conflict_fatal():
    eps = [ep("b", model_class("gpt2"), dist="aic"), ep("a", model_class("gpt2"), dist="acme")]
    with pytest.warns(UserWarning), pytest.raises(PluginError, match="conflict"):
        Registry(eps, strict=True)


def pinned_eps() -> list[FakeEntryPoint]:
    return [
        ep("builtin", model_class("builtin"), dist="aic"),
        ep("listed", model_class("listed"), dist="Acme_Plugins"),
        ep("unlisted", model_class("unlisted"), dist="other-dist"),
    ]


def test_pinned_skips_unlisted_third_party_but_not_builtins():
    reg = Registry(pinned_eps(), strict=True, pinned=["acme-plugins"])  # name normalised: Acme_Plugins
    assert reg.names("model") == ["builtin", "listed"]
    rec = record(reg, "unlisted")
    assert rec.status == "skipped" and "other-dist" in rec.error


def test_aic_plugins_env_var_pins(monkeypatch):
    monkeypatch.setenv("AIC_PLUGINS", "other_dist, ")
    assert Registry(pinned_eps(), strict=False).names("model") == ["builtin", "unlisted"]
    monkeypatch.setenv("AIC_PLUGINS", "")  # set but empty: only the built-ins
    assert Registry(pinned_eps(), strict=False).names("model") == ["builtin"]
    monkeypatch.delenv("AIC_PLUGINS")
    assert Registry(pinned_eps(), strict=False).names("model") == ["builtin", "listed", "unlisted"]


def test_explicit_pinned_overrides_env(monkeypatch):
    monkeypatch.setenv("AIC_PLUGINS", "other-dist")
    assert Registry(pinned_eps(), strict=False, pinned=[]).names("model") == ["builtin"]


def test_get_unknown_name_lists_installed_and_suggests():
    reg = Registry([ep("m", model_class("gpt2"), model_class("llama"))], strict=False)
    with pytest.raises(PluginError) as info:
        reg.get("model", "gtp2", where="model.type")
    msg = str(info.value)
    assert msg.startswith("model.type: unknown model plugin 'gtp2'")
    assert "did you mean 'gpt2'?" in msg
    assert "'gpt2', 'llama'" in msg
    with pytest.raises(PluginError, match="Installed tokenizer plugins: none"):
        reg.get("tokenizer", "sentencepiece")


def test_duplicate_name_between_third_parties_the_first_entry_point_by_name_wins():
    first, second = model_class("shared"), model_class("shared")
    for order in (
        [ep("zeta", second, dist="zeta-dist"), ep("alpha", first, dist="alpha-dist")],
        [ep("alpha", first, dist="alpha-dist"), ep("zeta", second, dist="zeta-dist")],
    ):
        with pytest.warns(UserWarning, match="'shared' from zeta-dist .* same name as the one from alpha-dist"):
            reg = Registry(order, strict=False)
        assert type(reg.get("model", "shared")) is first  # install order does not matter
        assert {(r.distribution, r.status) for r in reg.records} == {("alpha-dist", "ok"), ("zeta-dist", "conflict")}


def test_options_without_a_json_schema_are_refused():
    from collections.abc import Callable

    class Hooked(PluginOptions):
        callback: Callable = print

    reg = Registry([ep("hooked", model_class("hooked", Hooked)), ep("good", model_class("alpha"))], strict=False)
    rec = record(reg, "hooked")
    assert rec.status == "error" and "Options is not a valid Pydantic model: PydanticInvalidForJsonSchema" in rec.error
    assert reg.names("model") == ["alpha"]


def test_model_options_may_not_take_the_model_sections_own_keys():
    class Clash(PluginOptions):
        positional: int = 1
        init_from: str = "x"

    reg = Registry([ep("clash", model_class("clash", Clash))], strict=False)
    assert (
        "must not define 'positional', 'init_from': the spec's model section uses these keys itself"
        in record(reg, "clash").error
    )


def test_a_plugin_whose_constructor_raises_is_recorded():
    def __init__(self):
        raise ValueError("needs a GPU driver")

    cls = type("Fussy", (model_class("fussy"),), {"__init__": __init__})
    reg = Registry([ep("fussy", cls), ep("good", model_class("alpha"))], strict=False)
    assert "could not be created: ValueError: needs a GPU driver" in record(reg, "fussy").error
    assert reg.names("model") == ["alpha"]


def test_the_plugin_kinds_are_one_list():
    """aic_core.plugins.KINDS is the list; the bases, the hooks, the contracts and the CLI take theirs from it."""
    from aic_core import kinds as public_kinds
    from aic_core.authoring import testing
    from aic_core.plugins import KIND_HOOKS, KINDS, hookspecs, kinds

    assert KINDS == ("model", "positional", "adapter", "tokenizer", "trainer")
    assert public_kinds.KINDS is KINDS and kinds.KINDS is KINDS and hookspecs.HOOK_FOR_KIND is KIND_HOOKS
    assert tuple(kinds.BASES) == KINDS and all(base.kind == kind for kind, base in kinds.BASES.items())
    assert all(hasattr(getattr(hookspecs, hook), "aic_spec") for hook in KIND_HOOKS.values())  # each is a hookspec
    assert tuple(testing.CONTRACTS) == tuple(testing.KIND_CHECKS) == KINDS
