"""Contract tests for aic plugins: what the core relies on, checked on one plugin class.

A plugin package tests itself against the same contract the built-ins pass, in two ways:

    # tests/test_contract.py of a plugin package (pytest collects the inherited test_* methods)
    from aic_core.authoring.testing import PositionalContract
    from my_package.positional import Sinusoidal

    class TestSinusoidal(PositionalContract):
        plugin = Sinusoidal
        options = {"base": 10000.0}  # a small valid options section, without "type"

or by calling the check functions (`check_plugin`, `check_positional`, ...) from any test runner. A
failed check raises ContractError (an AssertionError) that says which promise broke and what to do.
Everything runs on the CPU in a few seconds: models are 2 layers of width 32.

Nothing here imports pytest; the contract classes are plain classes whose test_* methods pytest collects
when a subclass is named Test*.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
from pydantic import ValidationError
from torch import nn

from aic_core.errors import AicError, PluginError
from aic_core.model.nn.transformer import Transformer, TransformerConfig
from aic_core.plugins.kinds import BASES, KINDS, ModelPlugin, Plugin, PluginOptions, Positional, Tokenizer
from aic_core.plugins.registry import ENTRY_POINT_GROUP, Registry
from aic_core.spec import format_validation_error, json_schema, spec_model

# The shape every check builds: small enough for a CPU, with grouped-query heads (4 query, 2 KV) and a
# vocabulary that is not a multiple of 64, so the padded-vocabulary path runs too.
CONTRACT_CONFIG = TransformerConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
MIN_BLOCK_SIZE = 16  # the longest sequence a check decodes
TOLERANCE = 1e-4  # float32 logits of a 2-layer model: different kernels (cache / no cache) agree far closer

SAMPLE_TEXT = (
    "Anne Elliot walked to Uppercross  with\tCaptain Wentworth.\n\n"
    '"I am sure," said Mrs. Musgrove \u2014 \u201cquite sure\u201d \u2014 caf\u00e9, na\u00efve, 12.5%!\n'
)


def sample_corpus() -> str:
    """About 40 KB of deterministic English-like text (SAMPLE_TEXT included) for tokenizer checks."""
    words = (
        "the a of and to in was her she he it that had his with for not be as you at but all which said "
        "could would very been were on so they must by have more when an this from Anne Elliot Wentworth "
        "Captain Lady Russell Mary Musgrove Bath Kellynch Uppercross Sir Walter Louisa Henrietta Charles "
        "felt thought little much never always again house family sister friend walk morning evening time"
    ).split()
    rng = random.Random(0)
    lines = []
    for i in range(700):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(".,;!?") + ("\n\n" if i % 7 == 6 else "\n"))
    return SAMPLE_TEXT * 3 + "".join(lines)


class ContractError(AssertionError):
    """A plugin breaks a promise the core relies on. The message names the plugin, the promise and the fix."""


def _fail(cls: Any, what: str, fix: str = "") -> NoReturn:
    kind, name = getattr(cls, "kind", "?"), getattr(cls, "name", getattr(cls, "__name__", repr(cls)))
    raise ContractError(
        f"{kind} plugin '{name}' ({getattr(cls, '__qualname__', cls)}): {what}" + (f" {fix}" if fix else "")
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference between two tensors of one shape (inf if the shapes differ)."""
    if a.shape != b.shape:
        return math.inf
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --- registries and options ------------------------------------------------------------------------


@dataclass
class _Dist:
    name: str
    version: str = "0+contract"

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


class _ModuleEntryPoint:
    """An entry point of group `aic` for a module that is imported, not installed."""

    group = ENTRY_POINT_GROUP

    def __init__(self, name: str, module: str | Any, dist: str) -> None:
        self.name, self._module, self.dist = name, module, _Dist(dist)
        self.value = module if isinstance(module, str) else module.__name__

    def load(self) -> Any:
        return importlib.import_module(self._module) if isinstance(self._module, str) else self._module


def _classes_module(classes: tuple[type, ...]) -> Any:
    """A module object whose hooks register these classes, as a plugin module would."""
    import types

    from aic_core.plugins.hookspecs import HOOK_FOR_KIND, hookimpl

    module = types.ModuleType("aic_contract_plugins")
    for kind, hook in HOOK_FOR_KIND.items():
        ours = [c for c in classes if getattr(c, "kind", None) == kind]
        if ours:

            def register_all(register, _ours=ours):
                for c in _ours:
                    register(c)

            setattr(module, hook, hookimpl(register_all))  # pluggy matches the hook by the attribute's name
    return module


class _ContractModel(ModelPlugin):
    """A fixed small model: a positional plugin's options appear in a spec only under some model's section."""

    name = "contract-model"

    def config(self, options: PluginOptions, vocab_size: int) -> TransformerConfig:
        return CONTRACT_CONFIG


def registry_of(*classes: type) -> Registry:
    """A strict registry holding exactly these plugin classes (no installed plugin): what a spec in a test
    of one plugin validates against. Raises PluginError if the registry refuses a class."""
    dist = "aic-contract"
    return Registry([_ModuleEntryPoint("contract", _classes_module(classes), dist)], strict=True, pinned=[dist])


def _installed(kind: str, name: str) -> type[Plugin]:
    from aic_core.plugins.registry import get_registry

    plugin = get_registry().plugins(kind).get(name)
    if plugin is None:
        raise ContractError(
            f"the {kind} plugin '{name}' that this check needs is not installed; pass the plugin class itself "
            "instead of its name."
        )
    return type(plugin)


def _validate(registry: Registry, raw: dict[str, Any], model_only: bool, cls: type) -> Any:
    """Validate a spec as the core does; check that its JSON form validates to the same spec (resolved specs
    are written as JSON and read back into checkpoints)."""
    spec_cls = spec_model(registry, model_only=model_only)
    try:
        spec = spec_cls.model_validate(raw)
    except ValidationError as exc:
        _fail(
            cls,
            "the options given to the check do not validate: "
            + format_validation_error(exc, spec_cls, raw, "contract spec"),
            "Pass options that are valid for this plugin (the `options` of the contract class).",
        )
    dumped = spec.model_dump(mode="json")
    try:
        again = spec_cls.model_validate(dumped).model_dump(mode="json")
    except ValidationError as exc:
        _fail(
            cls,
            f"the options' JSON form does not validate again ({exc.errors()[0]['msg']}); a resolved spec could not "
            "be reloaded.",
            "Make every field serialise to JSON that the field itself accepts.",
        )
    if again != dumped:
        _fail(
            cls,
            f"the options change when read back from JSON: {dumped} -> {again}.",
            "Make validation idempotent: JSON in, the same JSON out.",
        )
    return spec


def _plugin_section(kind: str, cls: type, options: dict[str, Any]) -> dict[str, Any]:
    if "type" in options:
        _fail(
            cls,
            "the options given to the check contain 'type'.",
            "Pass the plugin's own options only; the check adds the type.",
        )
    return {"type": cls.name, **options}


def _base_raw() -> dict[str, Any]:
    return {"name": "contract", "model": {"type": "contract-model", "positional": {"type": "contract-positional"}}}


def _model_spec(cls: type, options: dict[str, Any], registry: Registry | None = None, **sections: Any) -> Any:
    raw = _base_raw()
    raw.update(sections)
    if cls.kind == "positional":  # its options sit under a model's section: the contract's own small model
        raw["model"]["positional"] = _plugin_section("positional", cls, options)
        registry = registry or registry_of(cls, _ContractModel)
    elif cls.kind == "model":
        raw["model"] = {**_plugin_section("model", cls, options), "positional": raw["model"]["positional"]}
    else:  # tokenizer, adapter
        raw[cls.kind] = _plugin_section(cls.kind, cls, options)
    return _validate(registry or registry_of(cls), raw, True, cls)


def check_options(cls: type, options: dict[str, Any] | None = None) -> None:
    """Options is a Pydantic model that refuses unknown keys, has a JSON Schema, and accepts `options`."""
    options = options or {}
    if getattr(cls, "kind", None) not in KINDS or not (isinstance(cls, type) and issubclass(cls, BASES[cls.kind])):
        raise ContractError(
            f"{cls!r} is not a subclass of one of aic_core.plugins.kinds' plugin bases "
            f"({', '.join(b.__name__ for b in BASES.values())})."
        )
    problem = Registry._invalid(cls.kind, cls)
    if problem:
        _fail(cls, problem)
    Options = cls.Options
    try:
        Options.model_validate({**options, "__contract_unknown_key__": 1})
    except ValidationError:
        pass
    else:
        _fail(
            cls,
            "Options accepted an unknown key.",
            "Subclass aic_core.kinds.PluginOptions (extra='forbid'): a typo in a spec must be an error.",
        )
    try:
        json.dumps(Options.model_json_schema())
    except Exception as exc:  # noqa: BLE001 - any failure here breaks `aic schema`
        _fail(
            cls,
            f"Options has no JSON Schema ({type(exc).__name__}: {exc}).",
            "Use field types Pydantic can describe in JSON.",
        )
    try:
        Options.model_validate(options)
    except ValidationError as exc:
        _fail(
            cls,
            f"Options refuses the options given to the check {options}: {exc.errors()[0]['msg']}.",
            "Pass valid options.",
        )


def check_registration(cls: type, module: str | None = None) -> None:
    """The plugin's module registers it through its hook, the registry accepts it, and it shows in `aic schema`."""
    module = module or cls.__module__
    eps = [_ModuleEntryPoint(cls.name, module, "aic-contract")]
    if cls.kind == "positional":
        eps.append(_ModuleEntryPoint("contract-model", _classes_module((_ContractModel,)), "aic-contract-model"))
    try:
        registry = Registry(eps, strict=True, pinned=["aic-contract", "aic-contract-model"])
    except PluginError as exc:
        _fail(cls, f"the registry refuses its module '{module}': {exc}")
    plugin = registry.plugins(cls.kind).get(cls.name)
    if type(plugin) is not cls:
        from aic_core.plugins.hookspecs import HOOK_FOR_KIND

        _fail(
            cls,
            f"module '{module}' does not register this class.",
            f"Add `@hookimpl def {HOOK_FOR_KIND[cls.kind]}(register): register({cls.__name__})` to {module}.",
        )
    schema = json.dumps(json_schema(registry))
    if json.dumps(cls.name) not in schema:
        _fail(cls, "the plugin does not appear in the spec's JSON Schema (`aic schema`).")


def check_entry_point(cls: type, module: str | None = None) -> None:
    """An installed distribution lists the plugin's module under the entry-point group `aic`, and loading that
    entry point registers the plugin. Needs the package installed (`pip install -e .`)."""
    from importlib import metadata

    module = module or cls.__module__
    eps = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.value.split(":")[0] == module]
    if not eps:
        _fail(
            cls,
            f"no installed entry point of group '{ENTRY_POINT_GROUP}' names module '{module}'.",
            f'Add `{cls.name} = "{module}"` under [project.entry-points.{ENTRY_POINT_GROUP}] in pyproject.toml and '
            "reinstall (pip install -e .).",
        )
    try:
        registry = Registry(eps[:1], strict=True, pinned=[eps[0].dist.metadata["Name"]] if eps[0].dist else None)
    except PluginError as exc:
        _fail(cls, f"its installed entry point '{eps[0].name} = {eps[0].value}' fails: {exc}")
    if cls.name not in registry.names(cls.kind):
        _fail(cls, f"the installed entry point '{eps[0].name} = {eps[0].value}' does not register it.")


# --- model checks shared by several kinds ------------------------------------------------------------


class _IdTokenizer(Tokenizer):
    """Text '<3><5>' <-> ids [3, 5]: injective, so generated ids can be compared through text."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(part) for part in text.replace("<", " ").replace(">", " ").split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


def _ids(shape: tuple[int, int], vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _check_runs(cls: type, model: Transformer, what: str, kv_cache: bool = True) -> None:
    """Forward shapes, the KV cache against full recomputation (if `kv_cache`), left padding against no
    padding, greedy decoding with and without the cache, and positions past block_size when allowed."""
    from aic_core.generate import generate
    from aic_core.spec import SamplerSpec

    c, V = model.config, model.config.vocab_size
    T = 10
    idx = _ids((2, T), V)
    with torch.no_grad():
        full = model(idx)
    if tuple(full.shape) != (2, T, V):
        _fail(
            cls, f"{what}: logits have shape {tuple(full.shape)}; expected (batch, time, vocab_size) = (2, {T}, {V})."
        )
    if not torch.isfinite(full).all():
        _fail(cls, f"{what}: the logits hold NaN or inf.")

    with torch.no_grad():
        cache = model.new_cache(2, T)
        pieces = (
            [model(idx[:, :6], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(6, T)]
            if kv_cache
            else [full]
        )
    diff = _close(torch.cat(pieces, dim=1), full)
    if diff > TOLERANCE:
        _fail(
            cls,
            f"{what}: decoding with the KV cache (a 6-token prompt, then one token at a time) differs from recomputing "
            f"the whole sequence by {diff:.2e}.",
            "Attention must see each token at its absolute position (`positions`), whatever the cache holds.",
        )

    # Left padding: row 0 is a 5-token sequence padded on the left to T; it must match the same 5 tokens alone.
    pad = T - 5
    padded = idx.clone()
    padded[0, :pad] = 0
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :pad] = 0
    positions = (torch.arange(T)[None, :] - torch.tensor([pad, 0])[:, None]).clamp(min=0)
    with torch.no_grad():
        out = model(padded, positions=positions, attention_mask=mask)
        alone = model(idx[:1, pad:])
    diff = _close(out[0, pad:], alone[0])
    if diff > TOLERANCE:
        _fail(
            cls,
            f"{what}: a left-padded sequence gives logits {diff:.2e} away from the same tokens without padding.",
            "Use the given `positions` (not the slot index) and let the core's attention mask hide the padding.",
        )

    tokenizer = _IdTokenizer(V)
    prompts = [
        tokenizer.decode(idx[0, :3].tolist()),
        tokenizer.decode(idx[1, :7].tolist()),
    ]  # different lengths: left padding
    greedy = SamplerSpec(temperature=0.0)
    with torch.no_grad():
        cached = generate(model, tokenizer, prompts, 5, greedy, use_cache=kv_cache)
        recomputed = generate(model, tokenizer, prompts, 5, greedy, use_cache=False)
        single = [generate(model, tokenizer, [p], 5, greedy, use_cache=kv_cache)[0] for p in prompts]
    if cached != recomputed:
        _fail(cls, f"{what}: greedy decoding with the KV cache gives {cached}, without it {recomputed}.")
    if cached != single:
        _fail(cls, f"{what}: greedy decoding of a left-padded batch gives {cached}, of each prompt alone {single}.")

    if model.positional.max_positions is None:
        far = torch.arange(3 * c.block_size, 3 * c.block_size + T).expand(2, T)
        with torch.no_grad():
            logits = model(idx, positions=far)
        if not torch.isfinite(logits).all():
            _fail(
                cls,
                f"{what}: positions past block_size give NaN or inf, but max_positions is None (no limit).",
                "Set `max_positions` on the Positional module to the largest position it can represent.",
            )


def _check_state_dict(cls: type, model: Transformer, rebuild: Any, what: str) -> None:
    """The weights save to safetensors and load into a freshly built model, which then computes the same logits."""
    from safetensors.torch import save

    from aic_core.train.checkpoint import model_state

    state = model_state(model)
    try:
        save(state)
    except Exception as exc:  # noqa: BLE001
        _fail(
            cls,
            f"{what}: the state dict cannot be saved as safetensors ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())}).",
            "Do not share one tensor between two state-dict entries (tie weights by reusing them in forward instead).",
        )
    torch.manual_seed(1)
    other = rebuild().eval()
    try:
        other.load_state_dict(state)
    except RuntimeError as exc:
        _fail(
            cls,
            f"{what}: a freshly built model does not load its state dict: {exc}",
            "Build the same modules, with the same names and shapes, for the same options.",
        )
    idx = _ids((2, min(model.config.block_size, 8)), model.config.vocab_size, seed=1)
    with torch.no_grad():
        diff = _close(other(idx), model(idx))
    if diff > TOLERANCE:
        _fail(
            cls,
            f"{what}: after loading the state dict, a freshly built model's logits differ by {diff:.2e}.",
            "Every tensor the forward depends on must be a parameter or a persistent buffer, or be rebuilt from the "
            "options.",
        )


def _check_gradients(cls: type, model: Transformer, what: str) -> None:
    c = model.config
    idx = _ids((2, min(c.block_size, 8)), c.vocab_size, seed=2)
    targets = _ids((2, min(c.block_size, 8)), c.vocab_size, seed=3)
    targets[0, 0] = -1  # ignored
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    if loss.dim() != 0 or not torch.isfinite(loss):
        _fail(cls, f"{what}: forward(idx, targets) should return a finite scalar loss; got {loss!r}.")
    with torch.no_grad():
        logits = model(idx).double()
    reference = nn.functional.cross_entropy(logits.reshape(-1, c.vocab_size), targets.reshape(-1), ignore_index=-1)
    if abs(loss.item() - reference.item()) > TOLERANCE:
        _fail(
            cls,
            f"{what}: the loss {loss.item():.6f} is not the mean cross-entropy of its logits ({reference.item():.6f}), "
            "with target -1 ignored.",
        )
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        _fail(
            cls,
            f"{what}: these trainable parameters get no gradient: {', '.join(unused[:6])}.",
            "Use every parameter in forward, or freeze it (requires_grad=False): DDP stops on unused parameters.",
        )
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        _fail(cls, f"{what}: these parameters get NaN or inf gradients: {', '.join(bad[:6])}.")
    model.zero_grad(set_to_none=True)


# --- positional ---------------------------------------------------------------------------------------


def check_positional(cls: type, options: dict[str, Any] | None = None) -> None:
    """Builds a Positional with consistent capabilities; hook outputs have the right shapes; inside the core's
    Transformer the KV cache matches full recomputation, left padding matches no padding, and the weights round-trip."""
    spec = _model_spec(cls, options or {})
    plugin = cls()
    section = spec.model.positional
    config = CONTRACT_CONFIG

    def build() -> Positional:
        positional = plugin.build(section, config)
        if not isinstance(positional, Positional):
            _fail(
                cls,
                f"build() returned {type(positional).__name__}, not an aic_core.kinds.Positional.",
                "Subclass Positional (an nn.Module).",
            )
        return positional

    torch.manual_seed(0)
    positional = build()
    if not isinstance(cls.extrapolates, bool) or not isinstance(cls.supports_kv_cache, bool):
        _fail(cls, "the capabilities `extrapolates` and `supports_kv_cache` must be booleans.")
    limit = positional.max_positions
    if limit is not None and (not isinstance(limit, int) or limit < config.block_size):
        _fail(
            cls,
            f"max_positions is {limit!r}; it must be None (no limit) or an int of at least block_size "
            f"({config.block_size}).",
        )
    if cls.extrapolates and limit is not None:
        _fail(
            cls,
            f"declares extrapolates=True but its Positional has max_positions={limit}.",
            "Set max_positions = None for an encoding that works at any position, or extrapolates = False.",
        )

    B, T, Tk, H, Hkv, D = 2, 3, 7, config.n_head, config.kv_heads, config.head_dim
    x = torch.randn(B, T, config.n_embd)
    q_pos = torch.arange(Tk - T, Tk).expand(B, T)  # the last 3 of 7 positions: a KV-cache step
    k_pos = torch.arange(Tk).expand(B, Tk)
    with torch.no_grad():
        embedded = positional.embed(x, q_pos)
        q, k = positional.rotate(torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), q_pos)
        bias = positional.attn_bias(q_pos, k_pos)
    for got, want, hook in (
        (embedded, (B, T, config.n_embd), "embed"),
        (q, (B, H, T, D), "rotate (q)"),
        (k, (B, Hkv, T, D), "rotate (k)"),
    ):
        if tuple(got.shape) != want or not torch.isfinite(got).all():
            _fail(cls, f"{hook} returned shape {tuple(got.shape)} (expected {want}) or non-finite values.")
    if bias is not None:
        if (
            bias.dim() != 4
            or bias.shape[0] not in (1, B)
            or bias.shape[1] not in (1, H)
            or tuple(bias.shape[2:]) != (T, Tk)
        ):
            _fail(
                cls,
                f"attn_bias returned shape {tuple(bias.shape)}; expected (B or 1, n_head or 1, Tq, Tk) = ({B}, {H}, "
                f"{T}, {Tk}).",
            )
        causal = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None].expand(bias.shape[0], bias.shape[1], T, Tk)
        if not torch.isfinite(bias[causal]).all():
            _fail(cls, "attn_bias is not finite for some key at or before its query.")

    model = Transformer(config, positional).eval()
    _check_runs(cls, model, "in the core Transformer", kv_cache=cls.supports_kv_cache)
    _check_gradients(cls, model, "in the core Transformer")
    _check_state_dict(cls, model, lambda: Transformer(config, build()), "in the core Transformer")


# --- model ---------------------------------------------------------------------------------------------


def _positional_class(positional: type | str) -> type:
    return positional if isinstance(positional, type) else _installed("positional", positional)


def check_model(
    cls: type,
    options: dict[str, Any] | None = None,
    positional: type | str | None = None,
    positional_options: dict[str, Any] | None = None,
) -> None:
    """config() honours the tokenizer's vocabulary; build() gives a core Transformer whose logits, loss and
    gradients are right, whose KV cache and left padding match full recomputation, and whose weights round-trip.

    `positional`: a PositionalPlugin class or an installed one's name (default: the model's default_positional)."""
    from aic_core.model.nn.transformer import TransformerConfig as Config

    pos_cls = _positional_class(positional or cls.default_positional)
    positional_section = _plugin_section("positional", pos_cls, positional_options or {})
    spec = _model_spec(
        cls, options or {}, registry_of(cls, pos_cls), model={"type": "x", "positional": positional_section}
    )
    plugin, pos_plugin = cls(), pos_cls()
    vocab = CONTRACT_CONFIG.vocab_size
    config = plugin.config(spec.model, vocab)
    if not isinstance(config, Config):
        _fail(cls, f"config() returned {type(config).__name__}, not an aic_core.nn.transformer.TransformerConfig.")
    if config.vocab_size < vocab:
        _fail(
            cls,
            f"config() gives vocab_size {config.vocab_size} for a tokenizer of {vocab} ids.",
            "Use the `vocab_size` argument when the options leave the vocabulary unset.",
        )
    if config.block_size < MIN_BLOCK_SIZE:
        _fail(
            cls,
            f"the options give block_size {config.block_size}; the checks decode sequences of up to {MIN_BLOCK_SIZE} "
            "tokens.",
            f"Pass options with a block_size of at least {MIN_BLOCK_SIZE} (and a small width, so the check takes "
            "seconds).",
        )

    def build() -> Transformer:
        model = plugin.build(spec.model, config, pos_plugin.build(spec.model.positional, config))
        if not isinstance(model, Transformer):
            _fail(
                cls,
                f"build() returned {type(model).__name__}, not an aic_core.nn.transformer.Transformer (or subclass).",
                "Build the core Transformer and change its modules, or subclass it: generation, checkpoints and "
                "trainers use its forward(idx, targets, positions, attention_mask, cache, last_only), new_cache() "
                "and wte.",
            )
        return model

    torch.manual_seed(0)
    model = build().eval()
    if model.config != config:
        _fail(cls, "build() returned a model whose .config is not the config it was given.")
    if not isinstance(model.num_params(), int) or model.num_params() <= 0:
        _fail(cls, f"num_params() returned {model.num_params()!r}.")
    _check_runs(cls, model, f"with positional '{pos_cls.name}'")
    _check_gradients(cls, model, f"with positional '{pos_cls.name}'")
    _check_state_dict(cls, model, build, f"with positional '{pos_cls.name}'")


# --- tokenizer -----------------------------------------------------------------------------------------


def check_tokenizer(
    cls: type,
    options: dict[str, Any] | None = None,
    tmp_dir: Path | str | None = None,
    corpus: str | None = None,
    sample: str | None = None,
) -> None:
    """train() writes exactly one file at `path` and returns a tokenizer; load() reads it back; encode/decode
    round-trip `sample` exactly with ids in range, also when the text is encoded in pieces; bad files are
    refused with an aic error."""
    if tmp_dir is None:
        with tempfile.TemporaryDirectory(prefix="aic-contract-") as tmp:
            return check_tokenizer(cls, options, tmp, corpus, sample)
    spec = _model_spec(cls, options or {})
    plugin, section = cls(), spec.tokenizer
    corpus = sample_corpus() if corpus is None else corpus
    sample = SAMPLE_TEXT if sample is None else sample
    tmp = Path(tmp_dir)
    corpus_file = tmp / "corpus.txt"
    corpus_file.write_text(corpus, encoding="utf-8")
    out = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=tmp))
    path = out / "tokenizer.model"
    if (
        not isinstance(cls.trains, bool)
        or not all(isinstance(f, str) for f in cls.hf_files)
        or not isinstance(cls.hf_files, tuple)
    ):
        _fail(cls, "`trains` must be a bool and `hf_files` a tuple of file names.")

    trained = plugin.train(section, [corpus_file], path)
    files = sorted(p.name for p in out.iterdir())
    if files != [path.name]:
        _fail(
            cls,
            f"train() left {files} in the folder of `path`; it must write exactly the one file `path` ({path.name}).",
            "The run directory and every checkpoint carry the tokenizer as that single file. Remove temporary files.",
        )
    loaded = plugin.load(section, path)
    for tok, how in ((trained, "the tokenizer train() returned"), (loaded, "the tokenizer load() returned")):
        if not isinstance(tok, Tokenizer):
            _fail(cls, f"{how} is a {type(tok).__name__}, not an aic_core.kinds.Tokenizer.")
        if not isinstance(tok.vocab_size, int) or tok.vocab_size <= 0:
            _fail(cls, f"{how} has vocab_size {tok.vocab_size!r}; it must be a positive int.")
        for special in ("bos_id", "eos_id"):
            value = getattr(tok, special)
            if value is not None and not (isinstance(value, int) and 0 <= value < tok.vocab_size):
                _fail(cls, f"{how} has {special} {value!r}; it must be None or an id below vocab_size.")
        ids = tok.encode(sample)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids):
            _fail(
                cls,
                f"{how}: encode() must return a non-empty list of ints in [0, vocab_size) for non-empty text; got "
                f"{str(ids)[:120]}.",
            )
        if tok.decode(ids) != sample:
            _fail(
                cls,
                f"{how}: decode(encode(text)) != text for the sample {sample!r}: got {tok.decode(ids)!r}.",
                "Keep whitespace and Unicode exactly (or pass a `sample` your tokenizer covers).",
            )
        if tok.encode("") != [] or tok.decode([]) != "":
            _fail(
                cls,
                f"{how}: encode('') must be [] and decode([]) ''.",
                "encode adds no bos/eos: the core adds eos between documents and starts empty prompts from bos itself.",
            )
        head, tail = sample[: sample.index("\n") + 1], sample[sample.index("\n") + 1 :]
        if tok.decode(tok.encode(head) + tok.encode(tail)) != sample:
            _fail(
                cls,
                f"{how}: text encoded in two pieces (cut at a line end) does not decode to the whole text.",
                "The core encodes a corpus in chunks of whole lines and concatenates the ids.",
            )
        if tok.eos_id is not None and not isinstance(
            tok.decode(tok.encode(head) + [tok.eos_id] + tok.encode(tail)), str
        ):
            _fail(cls, f"{how}: decode() fails on ids that contain eos_id (the core puts it between documents).")
        specials = getattr(tok, "special_ids", {})
        if not isinstance(specials, dict) or not all(
            isinstance(t, str) and t and isinstance(i, int) and 0 <= i < tok.vocab_size for t, i in specials.items()
        ):
            _fail(cls, f"{how} has special_ids {str(specials)[:120]}; it must map non-empty strings to ids.")
        for token, token_id in specials.items():
            typed = f"{head}{token}{tail}"
            if token_id in tok.encode(typed):
                _fail(
                    cls,
                    f"{how}: encode() gives the id of special token {token!r} for its characters typed in a text.",
                    "encode reads text as text; only encode_with_special gives special tokens' ids (tiktoken's "
                    "allowed_special), so a document or prompt cannot forge a chat template's tokens.",
                )
            if token_id not in tok.encode_with_special(typed):
                _fail(cls, f"{how}: encode_with_special() does not give the id of special token {token!r}.")
    if trained.vocab_size != loaded.vocab_size or trained.encode(sample) != loaded.encode(sample):
        _fail(cls, "the loaded tokenizer differs from the one train() returned (vocab_size or ids of the sample).")

    for bad, what in ((out / "missing.model", "a missing file"), (corpus_file, "a file that is not a tokenizer")):
        try:
            plugin.load(section, bad)
        except AicError:
            continue
        except Exception as exc:  # noqa: BLE001
            _fail(
                cls,
                f"load() of {what} raised {type(exc).__name__}: {exc}.",
                "Raise aic_core.errors.DataError naming the file and what to do, so `aic` prints one clear line.",
            )
        else:
            if what == "a missing file":
                _fail(cls, "load() of a missing file returned a tokenizer; raise aic_core.errors.DataError instead.")


# --- adapter -------------------------------------------------------------------------------------------


def check_adapter(cls: type, options: dict[str, Any] | None = None) -> None:
    """apply() wraps modules of the core Transformer in place, freezes the base and keeps its tensor names;
    only the adapter trains; merge() keeps the outputs; unmerge() restores the base weights."""
    spec = _model_spec(cls, options or {})
    plugin, section = cls(), spec.adapter
    config = CONTRACT_CONFIG
    torch.manual_seed(0)
    model = Transformer(config, Positional()).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}

    names = plugin.apply(model, section)
    modules = dict(model.named_modules())
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in modules for n in names):
        _fail(cls, f"apply() must return the names of the modules it wrapped (a non-empty list); got {names!r}.")
    state = model.state_dict()
    lost = sorted(set(base) - set(state))
    if lost:
        _fail(
            cls,
            f"after apply() the base tensors {', '.join(lost[:4])} are gone from the state dict.",
            "Keep the wrapped layer's `weight` and `bias` names, so a base checkpoint loads into the adapted model.",
        )
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    unfrozen = [n for n in trainable if n in base]
    if unfrozen:
        _fail(
            cls,
            f"apply() left base parameters trainable: {', '.join(unfrozen[:4])}.",
            "Freeze the base (requires_grad=False).",
        )
    if not trainable:
        _fail(cls, "apply() added no trainable parameters.")

    idx = _ids((2, 8), config.vocab_size)
    with torch.no_grad():
        for n in trainable:  # a trained adapter, not the identity it may start as
            params[n].add_(0.1 * torch.randn_like(params[n]))
        adapted = model(idx)
    loss = model(idx, _ids((2, 8), config.vocab_size, seed=1))
    loss.backward()
    if any(params[n].grad is None for n in trainable):
        _fail(cls, "some adapter parameters get no gradient from the loss.")
    model.zero_grad(set_to_none=True)

    plugin.merge(model)
    with torch.no_grad():
        diff = _close(model(idx), adapted)
    if diff > TOLERANCE:
        _fail(
            cls,
            f"after merge() the logits differ from the adapted model's by {diff:.2e}; merging must not change the "
            "function.",
        )
    plugin.unmerge(model)
    with torch.no_grad():
        diff = _close(model(idx), adapted)
    if diff > TOLERANCE:
        _fail(cls, f"after merge() then unmerge() the logits differ from the adapted model's by {diff:.2e}.")
    state = model.state_dict()
    changed = [k for k, v in base.items() if _close(state[k], v) > 1e-6]
    if changed:
        _fail(cls, f"merge() then unmerge() did not restore the base tensors {', '.join(changed[:4])}.")

    if hasattr(plugin, "adapter_state"):
        own = plugin.adapter_state(model)
        if (
            not own
            or set(own) & set(base)
            or not set(own) <= set(state)
            or any(t.device.type != "cpu" for t in own.values())
        ):
            _fail(
                cls,
                f"adapter_state() must return the adapter's own tensors, on the CPU, named as in the state dict "
                f"and none of the base's; got {sorted(own)[:6]}.",
            )
    if hasattr(plugin, "remove"):
        plugin.remove(model)
        with torch.no_grad():
            diff = _close(model(idx), adapted)
        if set(model.state_dict()) != set(base) or diff > TOLERANCE:
            _fail(
                cls,
                f"after remove() the model must be a plain model with the base's tensor names computing the adapted "
                f"function (logits differ by {diff:.2e}).",
            )


# --- trainer -------------------------------------------------------------------------------------------


def check_trainer(
    cls: type, options: dict[str, Any] | None = None, tmp_dir: Path | str | None = None, resume: bool = True
) -> None:
    """train() trains a tiny model for 4 steps, writing checkpoints as train.checkpoint_every says; with
    `resume`, stopping at step 2 and resuming gives the same weights as training straight through."""
    if tmp_dir is None:
        with tempfile.TemporaryDirectory(prefix="aic-contract-") as tmp:
            return check_trainer(cls, options, tmp, resume)
    import numpy as np

    from aic_core.data.tokens import TokenData
    from aic_core.files import file_sha256
    from aic_core.plugins.kinds import TrainJob
    from aic_core.train.checkpoint import list_checkpoints, open_checkpoint

    for caps in ("devices", "precisions"):
        value = getattr(cls, caps)
        if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
            _fail(cls, f"the capability `{caps}` must be a non-empty tuple of strings; got {value!r}.")
    tmp = Path(tmp_dir)
    registry = registry_of(cls)
    raw = {
        **_base_raw(),
        "data": {"train": ["unused.txt"]},
        "tokenizer": {"type": "contract-tokenizer"},
        "train": {
            "trainer": _plugin_section("trainer", cls, options or {}),
            "steps": 4,
            "batch_size": 2,
            "lr": 1e-2,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "eval": {"batches": 1},
    }
    plugin = cls()
    tokenizer_path = tmp / "tokenizer.model"
    tokenizer_path.write_bytes(b"contract tokenizer")
    ids = np.random.default_rng(0).integers(0, CONTRACT_CONFIG.vocab_size, 4000).astype(np.uint16)
    data = TokenData(ids[:3000], 3000), TokenData(ids[3000:], 1000)

    def run(name: str, resume_from: Path | None = None, stop_at: int | None = None) -> Path:
        run_raw = {**raw, "output_dir": str(tmp / name)}
        spec = _validate(registry, run_raw, False, cls)
        try:
            plugin.check(spec.train.trainer, spec)
        except AicError as exc:
            _fail(
                cls,
                f"check() refuses the contract's CPU-sized spec here: {exc}",
                "Pass trainer options that work on this machine.",
            )
        torch.manual_seed(0)
        model = Transformer(CONTRACT_CONFIG, Positional())
        job = TrainJob(
            spec=spec,
            resolved_spec=spec.model_dump(mode="json"),
            model=model,
            train_data=data[0],
            val_data=data[1],
            run_dir=tmp / name,
            tokenizer_path=tokenizer_path,
            tokenizer_hash=file_sha256(tokenizer_path),
            resume_from=resume_from,
            stop_at=stop_at,
        )
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        plugin.train(spec.train.trainer, job)
        if resume_from is None:
            weights = open_checkpoint(list_checkpoints(tmp / name)[-1]).weights()
            if all(_close(weights[k], v) == 0 for k, v in before.items()):
                _fail(cls, "train() did not change the model's weights.")
        return tmp / name

    straight = run("straight")
    steps = [p.name for p in list_checkpoints(straight)]
    if steps != ["step-2", "step-4"]:
        _fail(
            cls,
            f"with train.steps=4 and checkpoint_every=2 the run holds checkpoints {steps}; expected ['step-2', "
            "'step-4'].",
            "Save with job.save_checkpoint(step, ...) every checkpoint_every steps and at the end.",
        )
    if not resume:
        return
    stopped = run("resumed", stop_at=2)
    steps = [p.name for p in list_checkpoints(stopped)]
    if steps != ["step-2"]:
        _fail(cls, f"with stop_at=2 the run holds checkpoints {steps}; expected ['step-2'] (stop with a checkpoint).")
    run("resumed", resume_from=list_checkpoints(stopped)[-1])
    a, b = (
        open_checkpoint(straight / "checkpoints" / "step-4").weights(),
        open_checkpoint(stopped / "checkpoints" / "step-4").weights(),
    )
    diff = max(_close(a[k], b[k]) for k in a)
    if diff > 1e-5:
        _fail(
            cls,
            f"stopping at step 2 and resuming gives weights {diff:.2e} away from training straight to step 4.",
            "Save and restore the optimizer, scheduler and RNG state, and draw batches as a function of the step.",
        )


# --- one entry point -------------------------------------------------------------------------------------


def check_plugin(
    cls: type, options: dict[str, Any] | None = None, tmp_dir: Path | str | None = None, **kind_args: Any
) -> None:
    """Every contract check for the plugin's kind: options, registration, behaviour (`check_KIND`)."""
    check_options(cls, options)
    check_registration(cls)
    check = KIND_CHECKS[cls.kind]
    if "tmp_dir" in inspect.signature(check).parameters:  # the kinds whose checks write files
        kind_args["tmp_dir"] = tmp_dir
    check(cls, options, **kind_args)


# --- pytest-style contract classes ------------------------------------------------------------------------


class PluginContract:
    """Base of the contract classes: subclass one as `class TestMyPlugin(...Contract)` and set `plugin`."""

    plugin: ClassVar[type | None] = None
    options: ClassVar[dict[str, Any]] = {}  # a small valid options section, without "type"
    module: ClassVar[str | None] = None  # the module the entry point names (default: the class's module)

    def _plugin(self) -> type:
        if self.plugin is None:
            raise ContractError(f"{type(self).__name__}: set `plugin = YourPluginClass` on the contract class.")
        return self.plugin

    def test_options_model(self) -> None:
        check_options(self._plugin(), self.options)

    def test_registers_through_its_hook(self) -> None:
        check_registration(self._plugin(), self.module)


class PositionalContract(PluginContract):
    def test_positional_contract(self) -> None:
        check_positional(self._plugin(), self.options)


class ModelContract(PluginContract):
    positional: ClassVar[type | str | None] = None  # default: the model's default_positional (installed)
    positional_options: ClassVar[dict[str, Any]] = {}

    def test_model_contract(self) -> None:
        check_model(self._plugin(), self.options, self.positional, self.positional_options)


class TokenizerContract(PluginContract):
    corpus: ClassVar[str | None] = None  # default: sample_corpus()
    sample: ClassVar[str | None] = None  # default: SAMPLE_TEXT

    def test_tokenizer_contract(self, tmp_path: Path) -> None:
        check_tokenizer(self._plugin(), self.options, tmp_path, self.corpus, self.sample)


class AdapterContract(PluginContract):
    def test_adapter_contract(self) -> None:
        check_adapter(self._plugin(), self.options)


class TrainerContract(PluginContract):
    resume: ClassVar[bool] = True

    def test_trainer_contract(self, tmp_path: Path) -> None:
        check_trainer(self._plugin(), self.options, tmp_path, self.resume)


# Each kind's behaviour check and contract class, named after the kind (check_model, ModelContract, ...): a kind
# added to aic_core.plugins.KINDS without them fails here, at import.
KIND_CHECKS: dict[str, Callable[..., None]] = {kind: globals()[f"check_{kind}"] for kind in KINDS}
CONTRACTS: dict[str, type[PluginContract]] = {kind: globals()[f"{kind.capitalize()}Contract"] for kind in KINDS}

__all__ = [
    "CONTRACTS",
    "SAMPLE_TEXT",
    "AdapterContract",
    "ContractError",
    "ModelContract",
    "PluginContract",
    "PositionalContract",
    "TokenizerContract",
    "TrainerContract",
    "check_adapter",
    "check_entry_point",
    "check_model",
    "check_options",
    "check_plugin",
    "check_positional",
    "check_registration",
    "check_tokenizer",
    "check_trainer",
    "registry_of",
    "sample_corpus",
]
