"""The run spec: one JSON file validated into `RunSpec`.

Sections that name a `type` (tokenizer, model, model.positional, adapter, train.trainer) pick a plugin;
the plugin's own `Options` model validates the rest of that section. `spec_model(registry)` builds a
subclass of `RunSpec` in which each such section is the union of the installed plugins' options, so one
Pydantic validation checks everything, gives JSON paths for errors, and yields `aic schema`.
"""

from __future__ import annotations

import importlib.util
import json
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from aic_core.errors import TENSORBOARD_MISSING, AicError, SpecError, did_you_mean
from aic_core.plugins.kinds import KINDS
from aic_core.plugins.registry import Registry


class Section(BaseModel):
    # strict: a JSON `true` is not the integer 1 and "4" is not 4; a JSON int may still fill a float.
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=(), validate_assignment=False)


class PluginSection(Section):
    """A section whose `type` names a plugin; the plugin's options are the other keys."""

    type: str


class TokenizerSection(PluginSection):
    sample_bytes: int | None = Field(
        200_000_000,
        ge=1_000_000,
        description="At most this many bytes of data.train train the tokenizer, drawn evenly from all files as "
        "whole lines (deterministic: the same files give the same sample), which bounds the tokenizer's memory and "
        "time; null: all of it. The model still trains on all of data.train.",
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        description="A Jinja chat template in Hugging Face's dialect (messages, add_generation_prompt, bos_token, "
        "eos_token), stored with the tokenizer in the run and every checkpoint and exported into "
        "tokenizer_config.json. null: the built-in one, <|role|>content<|end|> per turn, where the tokenizer's "
        "special_tokens hold <|system|>, <|user|>, <|assistant|> and <|end|>.",
    )


class PositionalSection(PluginSection):
    pass


class ModelSection(PluginSection):
    positional: PositionalSection
    init_from: str | None = Field(
        None,
        description="Start from these weights instead of a random init: an aic run directory, one of its checkpoints, "
        "a folder from `aic import hf`, or a Hugging Face model folder. The model and tokenizer sections default to "
        "the source's; keys set here override them (shapes must still match the weights).",
    )


class AdapterSection(PluginSection):
    pass


class TrainerSection(PluginSection):
    pass


DataPath = Annotated[str, Field(min_length=1)]


class DataSpec(Section):
    train: list[DataPath] = Field(
        min_length=1,
        description="What to train on: files, folders (their data files by suffix, recursively) "
        "and glob patterns ('shards/*.jsonl', '**' for any depth), relative to the spec file. "
        "Files are read in order, each sorted by path.",
    )
    val: list[DataPath] = Field(
        default_factory=list, description="Validation data, as data.train; if empty, the tail of the training data."
    )
    val_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Fraction of the training tokens held out when `val` is empty."
    )
    format: Literal["auto", "text", "jsonl", "parquet", "chat"] = Field(
        "auto",
        description="How files are read: 'text' (UTF-8), 'jsonl' (one JSON object a line), 'parquet' (needs pip "
        "install \"aic[parquet]\"); 'auto' goes by suffix: .jsonl/.ndjson, .parquet/.pq, anything else text. "
        "'chat': rows of conversations (JSONL, or Parquet by suffix) in the OpenAI form (messages: role, content), "
        "ShareGPT's (conversations: from, value) or Alpaca's (instruction, input, output), rendered by the "
        "tokenizer's chat template; the loss covers what train.loss_on says.",
    )
    messages_field: str | None = Field(
        None,
        min_length=1,
        description="Chat data: the field holding a row's turns (default: 'messages', else 'conversations').",
    )
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict,
        description="Chat data: speaker names -> roles, beside the built-in human/gpt/bot/model (e.g. "
        '{"asker": "user"}).',
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Chat data: a conversation longer than train.seq_len + 1 tokens is cut there, or left out; the "
        "log says how many.",
    )
    pack: bool = Field(
        True,
        description="Chat data: pack several conversations into each train.seq_len row (best fit), each attending "
        "only to itself with positions from 0 (a block-diagonal mask); false: one conversation a row, padded.",
    )
    text_field: str = Field(
        "text", min_length=1, description="The JSONL field, or Parquet column, that holds each document's text."
    )
    separator: str | None = Field(
        None,
        min_length=1,
        description="In text files, the string between documents (e.g. '<|endoftext|>'), "
        "replaced by the end-of-text token; null: each text file is one document.",
    )
    bad_rows: Literal["refuse", "skip"] = Field(
        "refuse",
        description="JSONL/Parquet rows that are not JSON, lack text_field, hold a non-string or invalid UTF-8: "
        "'refuse' stops and names the first few (file and line); 'skip' leaves them out and reports how many.",
    )
    workers: int | None = Field(
        None,
        gt=0,
        description="Processes that encode the corpus (default: the CPUs available). "
        "The tokens are the same for any number.",
    )
    cache_dir: str | None = Field(
        None, description="Where encoded token arrays are cached (default: $AIC_CACHE_DIR or ~/.cache/aic)."
    )


class TrainSpec(Section):
    trainer: TrainerSection
    steps: int = Field(gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seq_len: int | None = Field(None, gt=1, description="Training context length (default: the model's block_size).")
    loss_on: Literal["assistant", "last_assistant", "all"] | None = Field(
        None,
        description="Which tokens the loss covers: 'assistant' (every assistant turn through its end-of-turn token; "
        "the default for chat data), 'last_assistant', or 'all' (the default for text). Validation loss and bits "
        "per byte cover the same tokens.",
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float | None = Field(None, ge=0, description="Final learning rate of the cosine decay (default lr/10).")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay, applied to matrices and embeddings only.")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this value; 0 turns clipping off.")
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0: only at the end).")
    keep_last: int | None = Field(
        None,
        ge=1,
        description="Keep only the newest N checkpoints, deleting older ones as new ones are saved (null: keep all). "
        "The checkpoint `latest` names and the one a --resume started from are never deleted.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block's activations during the backward pass instead of storing them: "
        "much less activation memory for about one more forward pass per step; the gradients are the same.",
    )
    log_every: int = Field(10, gt=0, description="Write training loss to metrics.jsonl every N steps.")
    log_to: list[Literal["jsonl", "tensorboard"]] = Field(
        default_factory=lambda: ["jsonl"],
        description='Where training metrics go: "jsonl" (metrics.jsonl, always written; `aic report` reads it) and '
        '"tensorboard" (scalars in <run>/tensorboard/; needs pip install "aic[tensorboard]").',
    )

    @model_validator(mode="after")
    def _lr_order(self) -> TrainSpec:
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is larger than lr ({self.lr}); set min_lr <= lr")
        return self


class EvalSpec(Section):
    every: int = Field(0, ge=0, description="Evaluate on the validation data every N steps (0: only at the end).")
    batches: int = Field(20, gt=0, description="Validation batches per evaluation.")
    batch_size: int | None = Field(None, gt=0, description="Default: train.batch_size.")
    exact_match: int = Field(
        0,
        ge=0,
        description="Chat data: answer the last user turn of this many validation conversations greedily and report "
        "the fraction whose reply equals the conversation's last assistant turn exactly (0: off); the answers go to "
        "answers.jsonl in the run directory.",
    )


class SamplerSpec(Section):
    temperature: float = Field(0.8, ge=0, description="0 means greedy decoding.")
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0)


DecodeStep = Literal["auto", "eager", "graph", "compile"]


class ChatMessage(Section):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateSpec(Section):
    prompts: list[str] = Field(default_factory=list)
    messages: list[list[ChatMessage]] = Field(
        default_factory=list,
        description="Conversations to reply to, through the tokenizer's chat template (each a list of "
        '{"role": "system"|"user"|"assistant", "content": ...}, ending with a user turn); the replies stop at the '
        "template's end-of-turn token and go to samples.txt after the prompts' samples.",
    )
    max_new_tokens: int = Field(200, gt=0)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    stop: list[str] = Field(
        default_factory=list, description="Stop a sequence when its new text contains one of these."
    )
    seed: int | None = Field(None, description="Sampling seed (default: the run's seed).")
    use_cache: bool = True
    decode_step: DecodeStep = Field(
        "auto",
        description="How each decode step runs: auto (a CUDA graph on a GPU, eager on the CPU), eager, graph (a CUDA "
        "graph), compile (torch.compile, then a CUDA graph: the fastest steps after a compile of 7-13 s).",
    )


class ModelSpec(Section):
    """What rebuilds and runs a model: a checkpoint's spec, or a run spec without its training sections."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 1337
    tokenizer: TokenizerSection | None = None
    model: ModelSection
    adapter: AdapterSection | None = None
    generate: GenerateSpec = Field(default_factory=GenerateSpec)


class RunSpec(ModelSpec):
    output_dir: str | None = Field(
        None, description="Run directory (default: runs/<name>, relative to the working directory)."
    )
    data: DataSpec
    tokenizer: TokenizerSection
    train: TrainSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


# --- building the spec model from the installed plugins ---------------------------------------------

# Where plugin sections live: (path in the spec, plugin kind).
PLUGIN_SECTIONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("tokenizer",), "tokenizer"),
    (("model",), "model"),
    (("model", "positional"), "positional"),
    (("adapter",), "adapter"),
    (("train", "trainer"), "trainer"),
)
DEFAULT_TRAINER = "torch"


def _variant(base: type[PluginSection], plugin: Any, **fields: Any) -> type[BaseModel]:
    return create_model(
        f"{base.__name__}_{plugin.name}",
        __base__=(base, plugin.Options),
        __doc__=(plugin.Options.__doc__ or f"{plugin.kind} plugin '{plugin.name}'"),
        type=(Literal[plugin.name], Field(description=f"{plugin.kind} plugin")),
        **fields,
    )


def _union(variants: list[type[BaseModel]], fallback: type[BaseModel]) -> Any:
    if not variants:
        return fallback
    if len(variants) == 1:
        return variants[0]
    return Annotated[Union[tuple(variants)], Field(discriminator="type")]  # noqa: UP007


def _cache_key(registry: Registry) -> tuple:
    return tuple((kind, tuple(registry.names(kind))) for kind in KINDS)


_models: dict[tuple[int, bool], tuple[tuple, type[ModelSpec]]] = {}


def spec_model(registry: Registry, model_only: bool = False) -> type[RunSpec]:
    """RunSpec (or, with model_only, ModelSpec) specialised to the installed plugins."""
    key = _cache_key(registry)
    cached = _models.get((id(registry), model_only))
    if cached and cached[0] == key:
        return cached[1]
    kinds = {kind: list(registry.plugins(kind).values()) for kind in KINDS}
    positional = _union([_variant(PositionalSection, p) for p in kinds["positional"]], PositionalSection)
    model = _union([_variant(ModelSection, p, positional=(positional, ...)) for p in kinds["model"]], ModelSection)
    tokenizer = _union([_variant(TokenizerSection, p) for p in kinds["tokenizer"]], TokenizerSection)
    adapter = _union([_variant(AdapterSection, p) for p in kinds["adapter"]], AdapterSection)
    if model_only:
        cls = create_model(
            "ModelSpec_",
            __base__=ModelSpec,
            __doc__="A model and its tokenizer, as a checkpoint records them.",
            tokenizer=(Union[tokenizer, None], None),  # noqa: UP007
            model=(model, ...),
            adapter=(Union[adapter, None], None),  # noqa: UP007
        )
    else:
        trainer = _union([_variant(TrainerSection, p) for p in kinds["trainer"]], TrainerSection)
        train = create_model("TrainSpec_", __base__=TrainSpec, trainer=(trainer, ...))
        cls = create_model(
            "RunSpec_",
            __base__=RunSpec,
            __doc__="An aic run: data, tokenizer, model, training, evaluation and generation.",
            tokenizer=(tokenizer, ...),
            model=(model, ...),
            adapter=(Union[adapter, None], None),  # noqa: UP007
            train=(train, ...),
        )
    _models[(id(registry), model_only)] = (key, cls)
    return cls


def json_schema(registry: Registry) -> dict[str, Any]:
    return spec_model(registry).model_json_schema()


# --- validation ------------------------------------------------------------------------------------


def _section(raw: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = raw
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _check_plugin_types(raw: dict[str, Any], registry: Registry, source: str, model_only: bool = False) -> None:
    """Name unknown or missing plugin types before Pydantic does, listing what is installed; fill defaults."""
    model = raw.get("model")
    if isinstance(model, dict) and "positional" not in model and isinstance(model.get("type"), str):
        plugin = registry.plugins("model").get(model["type"])
        if plugin is not None:
            model["positional"] = {"type": plugin.default_positional}
    train = raw.get("train")
    if isinstance(train, dict) and "trainer" not in train:
        train["trainer"] = {"type": DEFAULT_TRAINER}
    for path, kind in PLUGIN_SECTIONS:
        if model_only and path[0] == "train":
            continue
        node = _section(raw, path)
        if node is None or not isinstance(node, dict):
            continue  # Pydantic reports a missing section or a wrong type
        where = ".".join(path) + ".type"
        installed = ", ".join(f"'{n}'" for n in registry.names(kind)) or "none"
        name = node.get("type")
        if name is None:
            raise SpecError(
                f"{source}: {where} is missing: say which {kind} plugin to use. Installed {kind} plugins: {installed}."
            )
        if not isinstance(name, str) or name not in registry.names(kind):
            raise SpecError(
                f"{source}: {where}: unknown {kind} plugin {name!r}{did_you_mean(name, registry.names(kind))}. "
                f"Installed {kind} plugins: {installed}. "
                "Run `aic plugins` to see all plugins and any that failed to load."
            )


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _pick(models: list[type[BaseModel]], data: Any) -> type[BaseModel] | None:
    if len(models) == 1:
        return models[0]
    tag = data.get("type") if isinstance(data, dict) else None
    for m in models:
        field = m.model_fields.get("type")
        if field is not None and typing.get_args(field.annotation) == (tag,):
            return m
    return None


def _walk(cls: type[BaseModel], raw: Any, loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """Turn a Pydantic error location into a JSON path (dropping union tags); return the model at its parent."""
    path: list[str] = []
    model: type[BaseModel] | None = cls
    data = raw
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path[-1:] = [f"{path[-1]}[{part}]"] if path else [f"[{part}]"]
            data = data[part] if isinstance(data, list) and part < len(data) else None
            continue
        if isinstance(data, dict) and part not in data and data.get("type") == part:
            continue  # a discriminated-union tag, not a key
        path.append(str(part))
        if i == len(loc) - 1:
            break
        field = model.model_fields.get(part) if model else None
        data = data.get(part) if isinstance(data, dict) else None
        model = _pick(_models_in(field.annotation), data) if field else None
    return path, model


def format_validation_error(exc: ValidationError, cls: type[BaseModel], raw: Any, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path, parent = _walk(cls, raw, loc)
        where = ".".join(path) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            allowed = sorted(parent.model_fields) if parent else []
            hint = did_you_mean(key, allowed)
            lines.append(f"{where}: unknown key '{key}'{hint}. Allowed keys here: {', '.join(allowed)}.")
        elif kind == "missing":
            lines.append(f"{where}: required key is missing.")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            lines.append(f"{where}: {msg} (got {err.get('input')!r}).")
    return (
        f"{source}: the spec is invalid:\n  - "
        + "\n  - ".join(lines)
        + "\nFix the spec and run `aic validate` again; `aic schema` lists every allowed key."
    )


def parse_spec(
    raw: Any,
    registry: Registry,
    source: str = "spec",
    base_dir: Path | None = None,
    check: bool = True,
    model_only: bool = False,
    open_source: Callable[[Path, Registry], Any] | None = None,
) -> RunSpec:
    """Validate a spec dictionary; relative paths are taken from `base_dir` (the spec file's folder).

    With `check`, each plugin also refuses what it cannot do here (e.g. a CUDA device on a CPU machine),
    and the positional encoding's capabilities are checked. With `open_source` (loading.open_source), a
    `model.init_from` source is read and fills what the model and tokenizer sections leave unset. With `model_only`, the
    result is a ModelSpec (no data, train or eval sections)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a JSON object, got {type(raw).__name__}.")
    raw = json.loads(json.dumps(raw))  # a private copy: defaults are filled in
    if open_source is not None:
        _fill_from_init(raw, registry, source, base_dir, open_source)
    _check_plugin_types(raw, registry, source, model_only)
    cls = spec_model(registry, model_only)
    try:
        spec = cls.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, cls, raw, source)) from None
    if base_dir is not None and not model_only:
        spec.data.train = [str((base_dir / p).resolve()) for p in spec.data.train]
        spec.data.val = [str((base_dir / p).resolve()) for p in spec.data.val]
    for path, kind in PLUGIN_SECTIONS if check else ():
        section = _section_of(spec, path)
        if section is not None:
            registry.get(kind, section.type).check(section, spec)
    if check and not model_only:
        _check_positional(spec, registry, source)
        _check_chat(spec, registry, source)
        check_log_to(spec)
    return spec


def _check_chat(spec: RunSpec, registry: Registry, source: str) -> None:
    """Chat data and the loss on assistant turns go together; chat data needs a chat template."""
    from aic_core.data.chat import DEFAULT_SPECIALS

    chat = spec.data.format == "chat"
    if chat and spec.tokenizer.chat_template is None and not spec.model.init_from:
        planned = registry.get("tokenizer", spec.tokenizer.type).planned_special_tokens(spec.tokenizer)
        missing = [t for t in DEFAULT_SPECIALS if planned is not None and t not in planned]
        if missing:
            raise SpecError(
                f'{source}: data.format is "chat", but the tokenizer will have no chat template: '
                "tokenizer.chat_template is unset, and the built-in template needs the special tokens "
                f"{', '.join(DEFAULT_SPECIALS)} ({', '.join(missing)} missing from tokenizer.special_tokens). Add them "
                "to tokenizer.special_tokens, or set tokenizer.chat_template to a Jinja template."
            )
    if spec.train.loss_on in ("assistant", "last_assistant") and not chat:
        raise SpecError(
            f"{source}: train.loss_on: {spec.train.loss_on!r} needs chat data, where turns have roles; data.format is "
            f'{spec.data.format!r}, plain text, which has no assistant turns. Set data.format to "chat" (rows of '
            "conversations), or remove train.loss_on (the loss then covers every token)."
        )
    if spec.eval.exact_match and (not chat or spec.train.loss_on == "all"):
        why = (
            f"data.format is {spec.data.format!r}, plain text, which has no assistant turns"
            if not chat
            else 'train.loss_on is "all", so the assistant turns are not told apart'
        )
        raise SpecError(
            f"{source}: eval.exact_match: {spec.eval.exact_match} compares greedy replies with the last assistant turn "
            f"of validation conversations, but {why}. Remove eval.exact_match, or use chat data with train.loss_on "
            '"assistant" or "last_assistant".'
        )
    for i, conversation in enumerate(spec.generate.messages):
        if not conversation or conversation[-1].role != "user":
            raise SpecError(
                f"{source}: generate.messages[{i}]: a conversation to reply to ends with a user turn "
                f"(it {'is empty' if not conversation else f'ends with a {conversation[-1].role!r} turn'}). "
                'Add {"role": "user", "content": ...} at its end.'
            )
    if not chat and (spec.data.messages_field or spec.data.role_map or not spec.data.pack):
        key = "messages_field" if spec.data.messages_field else "role_map" if spec.data.role_map else "pack"
        raise SpecError(
            f"{source}: data.{key} is for chat data; data.format is {spec.data.format!r}. Set data.format to "
            f'"chat" or remove data.{key}.'
        )


def _fill_from_init(
    raw: dict[str, Any],
    registry: Registry,
    source: str,
    base_dir: Path | None,
    open_source: Callable[[Path, Registry], Any],
) -> None:
    """model.init_from: make the path absolute; take the model and tokenizer sections' unset keys from the source."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("init_from") is None:
        return
    if not isinstance(model["init_from"], str) or not model["init_from"]:
        raise SpecError(
            f"{source}: model.init_from: expected the path of a run, "
            f"checkpoint or Hugging Face folder (got {model['init_from']!r})."
        )
    path = Path(model["init_from"]).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        src = open_source(path, registry)
    except AicError as exc:
        raise SpecError(f"{source}: model.init_from: {exc}") from None
    if "type" in model and model["type"] != src.model_section["type"]:
        raise SpecError(
            f"{source}: model.type: {model['type']!r}, but the init_from source {path} holds a "
            f"{src.model_section['type']!r} model. Remove model.type (it comes from the source) "
            f"or start from a {model['type']!r} checkpoint."
        )
    merged = {
        **src.model_section,
        **{k: v for k, v in model.items() if k != "positional"},
        "init_from": str(path.resolve()),
    }
    positional = model.get("positional")
    if (
        isinstance(positional, dict)
        and positional.get("type", src.model_section["positional"]["type"]) == src.model_section["positional"]["type"]
    ):
        merged["positional"] = {**src.model_section["positional"], **positional}
    elif positional is not None:
        merged["positional"] = positional  # another encoding: the weights decide whether it loads
    raw["model"] = merged
    if src.tokenizer_section is None:
        raise SpecError(
            f"{source}: model.init_from: {path} carries no tokenizer, and a model only makes sense with the tokenizer "
            "it was trained with. Put the model's tokenizer file in that folder (for sentencepiece: tokenizer.model) "
            "and import it again."
        )
    tokenizer = raw.get("tokenizer")
    if tokenizer is None:
        raw["tokenizer"] = dict(src.tokenizer_section)
    elif isinstance(tokenizer, dict) and tokenizer.get("type") != src.tokenizer_section["type"]:
        raise SpecError(
            f"{source}: tokenizer.type: {tokenizer.get('type')!r}, but the init_from source {path} was trained with a "
            f"{src.tokenizer_section['type']!r} tokenizer, which the run reuses. Remove the tokenizer section."
        )


def _check_positional(spec: RunSpec, registry: Registry, source: str) -> None:
    """Refuse, before any work, what the positional encoding cannot do."""
    plugin = registry.get("positional", spec.model.positional.type)
    if spec.generate.use_cache and not plugin.supports_kv_cache:
        raise SpecError(
            f"{source}: generate.use_cache: the '{plugin.name}' positional encoding does not work with the KV cache "
            "(it declares supports_kv_cache = False). Set generate.use_cache to false (each step then "
            "recomputes the sequence)."
        )
    block_size = getattr(spec.model, "block_size", None)
    if plugin.extrapolates or block_size is None:
        return
    if spec.generate.prompts and spec.generate.max_new_tokens >= block_size:
        raise SpecError(
            f"{source}: generate.max_new_tokens: {spec.generate.max_new_tokens} new tokens reach past the model's "
            f"{block_size} positions (block_size), and '{plugin.name}' positions cannot extrapolate. "
            f"Lower generate.max_new_tokens below {block_size} (minus the prompt's length), or use an extrapolating "
            f"positional encoding such as rope or alibi."
        )


def check_log_to(spec: Any) -> None:
    """Refuse, before any work, a `train.log_to` sink whose package is missing."""
    if "tensorboard" in spec.train.log_to and importlib.util.find_spec("tensorboard") is None:
        raise SpecError(TENSORBOARD_MISSING)


def warn_surprises(spec: Any) -> None:
    """Warn about a valid spec that would not do what it seems to (`aic validate` and `aic run`, on rank 0)."""
    if spec.adapter is not None and not spec.model.init_from:
        warnings.warn(
            f"adapter: a {spec.adapter.type} adapter on a model without model.init_from: the base model keeps its "
            "random initial weights, frozen, and only the adapter trains on top of them. Set model.init_from to a "
            "trained run, checkpoint or Hugging Face folder, or remove the adapter section to train the whole model.",
            stacklevel=2,
        )
    t = spec.train
    if t.warmup_steps > t.steps:
        warnings.warn(
            f"train.warmup_steps: {t.warmup_steps} is more than train.steps ({t.steps}): the learning rate rises for "
            f"the whole run and reaches only {t.steps / t.warmup_steps:.0%} of train.lr "
            f"({t.lr * t.steps / t.warmup_steps:.2e} of {t.lr:.2e}), with no decay. Lower train.warmup_steps to at "
            f"most {t.steps} (a tenth of the steps is usual), or raise train.steps.",
            stacklevel=2,
        )


def _section_of(spec: RunSpec, path: tuple[str, ...]) -> Any:
    node: Any = spec
    for key in path:
        node = getattr(node, key, None)
        if node is None:
            return None
    return node


def load_spec_file(
    path: str | Path, registry: Registry, open_source: Callable[[Path, Registry], Any] | None = None
) -> RunSpec:
    """A spec file, validated. `aic_core.model.loading.load_spec` passes `open_source`, which reads a `model.init_from`
    source (the spec module itself opens no models)."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(
            f"{path}: is a directory, not a spec file. Pass the path of a JSON run spec, e.g. "
            "examples/austen-tiny.json."
        )
    if not path.is_file():
        raise SpecError(
            f"{path}: spec file not found. Pass the path of a JSON run spec, e.g. examples/austen-tiny.json."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file; a spec is a JSON file.") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot be read ({exc.strerror or exc}). Check the file's permissions.") from None
    if not text.strip():
        raise SpecError(f"{path}: the file is empty. A spec is a JSON object; start from examples/austen-tiny.json.")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: {_json_problem(text, exc)}") from None
    return parse_spec(raw, registry, source=str(path), base_dir=path.resolve().parent, open_source=open_source)


def _json_problem(text: str, exc: json.JSONDecodeError) -> str:
    """What is wrong with a spec that is not JSON; comments get their own message (JSON has none)."""
    where = f"line {exc.lineno}, column {exc.colno}"
    rest = text[exc.pos :].lstrip()
    if rest.startswith("//") or rest.startswith("/*") or rest.startswith("#"):
        return (
            f"not valid JSON: a comment at {where}. A spec is plain JSON, which has no comments "
            f"(// ..., /* ... */ or # ...): remove them. `aic schema` describes every key instead."
        )
    return f"not valid JSON: {exc.msg} at {where}. Fix the JSON syntax."


def resolved_dict(spec: RunSpec, registry: Registry) -> dict[str, Any]:
    """The spec with defaults filled in, plus the versions of aic, torch and each plugin used."""
    import torch

    import aic_core

    data = spec.model_dump(mode="json")
    plugins = {}
    for path, kind in PLUGIN_SECTIONS:
        section = _section_of(spec, path)
        if section is not None:
            plugins[".".join(path)] = f"{section.type} ({registry.version_of(registry.get(kind, section.type))})"
    data["versions"] = {"aic": aic_core.__version__, "torch": torch.__version__, "plugins": plugins}
    return data


def spec_from_resolved(data: dict[str, Any], registry: Registry, source: str) -> ModelSpec:
    """Rebuild a spec from a resolved one (versions dropped; paths already absolute): a RunSpec for a trained
    checkpoint, a ModelSpec for an imported one. Plugins' run-time checks are skipped: a GPU-trained
    checkpoint still loads on a CPU for generation."""
    data = {k: v for k, v in data.items() if k != "versions"}
    return parse_spec(data, registry, source=source, check=False, model_only="train" not in data)
