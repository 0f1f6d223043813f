"""`aic new-plugin KIND NAME`: write a plugin package that installs, registers and passes its own tests.

    aic-NAME/
      pyproject.toml          the entry point: NAME = "aic_NAME.plugin" under [project.entry-points.aic]
      README.md               install, test, use in a spec
      aic_NAME/__init__.py
      aic_NAME/plugin.py      a small working plugin of KIND, to change into yours
      tests/test_aic_NAME.py  aic's contract tests for KIND (aic_core.testing) and the entry-point check

The templates are working plugins, not stubs: model (a GPT from the core's blocks), positional (NoPE: adds
no position information), tokenizer (characters), adapter (a learned scale per output channel, like IA3),
trainer (one device, AdamW, exact resume).
"""

from __future__ import annotations

import re
from pathlib import Path

from aic_core.errors import AicError, did_you_mean
from aic_core.plugins.kinds import KINDS

_NAME = re.compile(r"^[a-z][a-z0-9]*([-_][a-z0-9]+)*$")
RESERVED = {"core": "aic_core", "plugins": "aic_plugins"}  # import packages of aic itself


def names_for(name: str) -> dict[str, str]:
    """The distribution, import package and class-name stem of a plugin called `name`."""
    package = "aic_" + name.replace("-", "_")
    return {
        "__NAME__": name,
        "__DIST__": "aic-" + name.replace("_", "-"),
        "__PKG__": package,
        "__C__": "".join(part.capitalize() for part in re.split(r"[-_]", name)),
    }


def check_arguments(kind: str, name: str) -> None:
    """Refuse, with an aic error naming the argument, the value and the fix, what would not make a working package."""
    if kind not in KINDS:
        raise AicError(
            f"new-plugin KIND: unknown plugin kind {kind!r}{did_you_mean(kind, KINDS)}. "
            f"Choose one of: {', '.join(KINDS)}; for example `aic new-plugin positional my-positions`."
        )
    if not _NAME.match(name) or len(name) > 40:
        suggestion = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        suggestion = suggestion if _NAME.match(suggestion) else "my-plugin"
        raise AicError(
            f"new-plugin NAME: {name!r} is not a plugin name. Use at most 40 lower-case letters and digits, starting with a "
            f"letter, in parts joined by single '-' or '_' (e.g. {suggestion!r}); the package is named aic-NAME and imports as aic_NAME."
        )
    if name in RESERVED:
        raise AicError(
            f"new-plugin NAME: {name!r} would make the import package {RESERVED[name]}, which is aic's own and would shadow it. Choose another name."
        )


def new_plugin(kind: str, name: str, folder: Path | None = None) -> Path:
    """Write the package for a `kind` plugin called `name` into `folder` (default ./aic-NAME); return the folder."""
    check_arguments(kind, name)
    from aic_core.plugins.registry import get_registry

    existing = get_registry().plugins(kind).get(name)
    if existing is not None:
        source = get_registry().version_of(existing)
        raise AicError(
            f"new-plugin NAME: a {kind} plugin named {name!r} is already installed ({source}); two {kind} plugins cannot share "
            f"a name (the one loaded first would win). Choose another name."
        )
    names = names_for(name)
    where = "--dir" if folder is not None else "new-plugin (the default folder ./aic-NAME)"
    folder = Path(folder) if folder is not None else Path.cwd() / names["__DIST__"]
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise AicError(
            f"{where}: {folder} already exists and is not an empty folder; nothing was written. "
            f"Pass another folder with --dir, or move that one away."
        )
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README + USE[kind],
        "__PKG__/__init__.py": INIT,
        "__PKG__/plugin.py": PLUGIN[kind],
        "tests/test___PKG__.py": contract_test_module(kind),
    }
    for relative, template in files.items():
        path = folder / _fill(relative, names)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(template, {**names, "__KIND__": kind}), encoding="utf-8")
    return folder


def _fill(template: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        template = template.replace(key, value)
    return template


# --- templates ------------------------------------------------------------------------------------
# Placeholders: __NAME__ (plugin name), __DIST__ (distribution), __PKG__ (import package), __C__ (class-name stem),
# __KIND__. The aic base classes are used as `kinds.X`, so no generated class name can shadow one.

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "The __NAME__ __KIND__ plugin for aic."
readme = "README.md"
requires-python = ">=3.10"
# aic is not listed: install it from its repository first (the name "aic" on PyPI is an unrelated project).
dependencies = []

# aic finds plugins through this entry-point group; the module implements the __KIND__ hook.
[project.entry-points.aic]
__NAME__ = "__PKG__.plugin"

[tool.setuptools]
packages = ["__PKG__"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

INIT = '''\
"""The __NAME__ __KIND__ plugin for aic."""

__version__ = "0.1.0"
'''

README = """\
# __DIST__

The `__NAME__` __KIND__ plugin for aic, generated by `aic new-plugin __KIND__ __NAME__`.

```bash
pip install -e .                 # in the environment where aic is installed
aic plugins                      # lists __NAME__ (__KIND__, __DIST__)
python -m pytest                 # aic's contract tests for a __KIND__ plugin, and the entry-point check
```

The plugin is in `__PKG__/plugin.py`; `tests/test___PKG__.py` runs aic's contract tests for the kind
(`aic_core.testing`). Change the plugin, keep the tests passing. aic's `docs/plugins.md` describes each kind's
interface, options and capabilities.

"""

USE = {
    "model": """\
Use it in a run spec:

```json
"model": {"type": "__NAME__", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "positional": {"type": "learned"}}
```
""",
    "positional": """\
Use it in a run spec, with any model:

```json
"model": {"type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "positional": {"type": "__NAME__"}}
```
""",
    "tokenizer": """\
Use it in a run spec:

```json
"tokenizer": {"type": "__NAME__"}
```
""",
    "adapter": """\
Use it in a run spec (the base model is frozen; only the adapter trains):

```json
"adapter": {"type": "__NAME__", "targets": ["attn.qkv", "attn.proj"]}
```
""",
    "trainer": """\
Use it in a run spec:

```json
"train": {"trainer": {"type": "__NAME__", "device": "cpu"}, "steps": 600, "batch_size": 16, "lr": 0.002}
```
""",
}

PLUGIN: dict[str, str] = {}
# The plugin class each template defines, and extra class attributes its contract test needs.
PLUGIN_CLASS = {
    "model": "Model",
    "positional": "Positional",
    "tokenizer": "TokenizerPlugin",
    "adapter": "Adapter",
    "trainer": "Trainer",
}
CONTRACT_EXTRA = {"model": '\n    options = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16}'}


def contract_test_module(kind: str) -> str:
    """The generated package's test: its plugin against aic's contract for the kind, and its entry point."""
    cls = "__C__" + PLUGIN_CLASS[kind]
    return f'''"""__NAME__ against aic's contract for {kind} plugins."""

from aic_core.testing import {kind.capitalize()}Contract, check_entry_point
from __PKG__.plugin import {cls}


class Test__C__{PLUGIN_CLASS[kind].removesuffix("Plugin")}({kind.capitalize()}Contract):
    plugin = {cls}{CONTRACT_EXTRA.get(kind, "")}


def test_the_plugin_is_installed_under_the_aic_entry_points():
    check_entry_point({cls})
'''


PLUGIN["model"] = '''\
"""__NAME__: a model plugin for aic (generated by `aic new-plugin model __NAME__`).

As generated it is a GPT built from aic's core Transformer. Change `config()` to pick the core's building
blocks (norm "layernorm" or "rmsnorm", mlp "gelu" or "swiglu", n_kv_head for grouped-query attention,
bias), or `build()` to swap modules of the built Transformer for your own.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from aic_core import kinds
from aic_core.hookspecs import hookimpl
from aic_core.nn.transformer import Transformer, TransformerConfig


class __C__Options(kinds.PluginOptions):
    """__NAME__: a GPT. Every field has a small default."""

    n_layer: int = Field(4, gt=0)
    n_head: int = Field(4, gt=0)
    n_embd: int = Field(128, gt=0)
    block_size: int = Field(128, gt=1, description="Context length.")
    vocab_size: int | None = Field(None, gt=0, description="Default: the tokenizer's vocabulary size.")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> __C__Options:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); pick an n_head that divides it")
        return self


class __C__Model(kinds.ModelPlugin):
    """__NAME__: a GPT with LayerNorm and a GELU MLP."""

    name = "__NAME__"
    Options = __C__Options
    default_positional = "learned"  # used when a spec names no model.positional; any installed one works

    def config(self, options: __C__Options, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=options.vocab_size or vocab_size,
            block_size=options.block_size,
            n_layer=options.n_layer,
            n_head=options.n_head,
            n_embd=options.n_embd,
            norm="layernorm",
            mlp="gelu",
            dropout=options.dropout,
        )

    def build(self, options: __C__Options, config: TransformerConfig, positional: kinds.Positional) -> Transformer:
        return Transformer(config, positional)


@hookimpl
def aic_register_models(register):
    register(__C__Model)
'''

PLUGIN["positional"] = '''\
"""__NAME__: a positional-encoding plugin for aic (generated by `aic new-plugin positional __NAME__`).

As generated it adds no position information (NoPE: the causal mask alone lets a decoder infer order).
Fill in the hooks of __C__Positions you need. Each receives absolute positions, so the encoding works with
the KV cache and with left-padded batches.
"""

from __future__ import annotations

import torch

from aic_core import kinds
from aic_core.hookspecs import hookimpl
from aic_core.nn.transformer import TransformerConfig


class __C__Options(kinds.PluginOptions):
    """__NAME__ positions. Add options as fields (with defaults and descriptions)."""


class __C__Positions(kinds.Positional):
    max_positions = None  # the largest position this encoding represents; None: any position

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C) and positions (B, T) -> embeddings with positions added (learned, sinusoidal)."""
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k (B, Hkv, T, D) and positions (B, T) -> rotated q and k (RoPE)."""
        return q, k

    def attn_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor | None:
        """Query and key positions (B, Tq), (B, Tk) -> an additive attention bias (B, H, Tq, Tk), or None (ALiBi)."""
        return None


class __C__Positional(kinds.PositionalPlugin):
    """__NAME__ positions."""

    name = "__NAME__"
    Options = __C__Options
    extrapolates = True  # works past the trained context length (then max_positions must be None)
    supports_kv_cache = True

    def build(self, options: __C__Options, config: TransformerConfig) -> kinds.Positional:
        return __C__Positions()


@hookimpl
def aic_register_positional_encodings(register):
    register(__C__Positional)
'''

PLUGIN["tokenizer"] = '''\
"""__NAME__: a tokenizer plugin for aic (generated by `aic new-plugin tokenizer __NAME__`).

As generated it is a character-level tokenizer. Training collects the corpus's characters; id 0 ends a
document (eos), id 1 stands for a character the corpus did not have (it decodes as U+FFFD), ids 2.. are
the characters. The tokenizer is one JSON file, written by `train` and read by `load`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from pydantic import Field

from aic_core import kinds
from aic_core.errors import DataError
from aic_core.hookspecs import hookimpl

FORMAT = "__PKG__/chars"
EOS, UNKNOWN, FIRST_CHAR = 0, 1, 2


class __C__Options(kinds.PluginOptions):
    """__NAME__: one token per character."""

    max_chars: int = Field(10000, gt=0, description="Keep at most this many distinct characters, the most frequent.")


class __C__Tokenizer(kinds.Tokenizer):
    bos_id = None
    eos_id = EOS

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.ids = {c: FIRST_CHAR + i for i, c in enumerate(chars)}
        self.vocab_size = FIRST_CHAR + len(chars)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, UNKNOWN) for c in text]

    def decode(self, ids: list[int]) -> str:
        out = []
        for pos, i in enumerate(ids):
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} at position {pos} is out of range for this tokenizer (ids 0..{self.vocab_size - 1}).")
            if i >= FIRST_CHAR:
                out.append(self.chars[i - FIRST_CHAR])
            elif i == UNKNOWN:
                out.append("\\ufffd")
        return "".join(out)


class __C__TokenizerPlugin(kinds.TokenizerPlugin):
    """__NAME__: characters as tokens, learned from the corpus."""

    name = "__NAME__"
    Options = __C__Options
    trains = True

    def train(self, options: __C__Options, files: list[Path], path: Path) -> kinds.Tokenizer:
        counts: Counter[str] = Counter()
        for f in files:
            try:
                counts.update(Path(f).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{f}: cannot be read as UTF-8 text ({exc}). List UTF-8 text files under data.train.") from None
        if not counts:
            raise DataError(f"{', '.join(str(f) for f in files) or 'data.train'}: no text to train the tokenizer on. Give data.train some text.")
        chars = "".join(sorted(c for c, _ in counts.most_common(options.max_chars)))
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # write, then rename: never a half-written file
        tmp.write_text(json.dumps({"format": FORMAT, "chars": chars}), encoding="utf-8")
        os.replace(tmp, path)
        return __C__Tokenizer(chars)

    def load(self, options: __C__Options, path: Path) -> kinds.Tokenizer:
        try:
            meta = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer file not found. Run the tokenizer stage (`aic run SPEC --stage tokenizer`) or restore it.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("chars"), str):
            raise DataError(f"{path}: not a __NAME__ tokenizer file; use the tokenizer the run or checkpoint was made with.")
        return __C__Tokenizer(meta["chars"])


@hookimpl
def aic_register_tokenizers(register):
    register(__C__TokenizerPlugin)
'''

PLUGIN["adapter"] = '''\
"""__NAME__: an adapter plugin for aic (generated by `aic new-plugin adapter __NAME__`).

As generated it learns one scale per output channel of the targeted linear layers, y = (x W^T + b) * s
(as IA3 does), with s starting at 1 so the adapted model starts equal to the base. The base is frozen;
`merge` folds s into W and b, `unmerge` restores them exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from aic_core import kinds
from aic_core.errors import PluginError
from aic_core.hookspecs import hookimpl


class __C__Options(kinds.PluginOptions):
    """__NAME__: a learned output scale on the targeted linear layers."""

    targets: list[str] = Field(
        default_factory=lambda: ["attn.qkv", "attn.proj"],
        min_length=1,
        description="Linear layers to adapt, matched against the end of each layer's name ('attn.qkv', 'mlp.fc').",
    )


class __C__Linear(nn.Linear):
    """nn.Linear with a learned output scale. It holds the base layer's own `weight` and `bias` Parameters, so
    their names in the state dict do not change and a base checkpoint loads into the adapted model."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = nn.Parameter(torch.ones(base.out_features, device=base.weight.device, dtype=base.weight.dtype))
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the base's weight and bias while merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self._unmerged is not None else y * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if self._unmerged is None:
            self._unmerged = (self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())
            self.weight.mul_(self.scale[:, None])
            if self.bias is not None:
                self.bias.mul_(self.scale)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._unmerged is not None:
            weight, bias = self._unmerged
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
            self._unmerged = None

    def plain(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (merged)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def _wrapped(model: nn.Module) -> list[tuple[str, __C__Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, __C__Linear)]


class __C__Adapter(kinds.AdapterPlugin):
    """__NAME__: a learned scale per output channel of the targeted linear layers."""

    name = "__NAME__"
    Options = __C__Options

    def apply(self, model: nn.Module, options: __C__Options) -> list[str]:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        names = [n for n in linears if any(n == t or n.endswith("." + t) for t in options.targets)]
        if not names:
            endings = sorted({".".join(n.split(".")[-2:]) for n in linears})
            raise PluginError(f"adapter.targets: {options.targets} match no linear layer of this model; its linear layers end in {', '.join(endings)}.")
        model.requires_grad_(False)  # freeze the base: only the scales train
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, __C__Linear(getattr(owner, child)))
        return names

    def merge(self, model: nn.Module) -> None:
        for _, layer in _wrapped(model):
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, layer in _wrapped(model):
            layer.unmerge()

    def remove(self, model: nn.Module) -> None:
        for name, layer in _wrapped(model):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.plain())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.scale": layer.scale.detach().cpu() for name, layer in _wrapped(model)}


@hookimpl
def aic_register_adapters(register):
    register(__C__Adapter)
'''

PLUGIN["trainer"] = '''\
"""__NAME__: a trainer plugin for aic (generated by `aic new-plugin trainer __NAME__`).

As generated it trains on one device with AdamW and the spec's warmup + cosine schedule, evaluates at the
end, checkpoints every train.checkpoint_every steps through `job.save_checkpoint`, and resumes exactly:
optimizer, scheduler and RNG state are saved, and batches are a function of the step.
"""

from __future__ import annotations

import torch
from pydantic import Field

from aic_core import kinds
from aic_core.checkpoint import model_state, open_checkpoint
from aic_core.errors import SpecError
from aic_core.hookspecs import hookimpl
from aic_core.training import MetricsLog, evaluate, lr_at, param_groups, rng_state, set_rng_state, train_batch


class __C__Options(kinds.PluginOptions):
    """__NAME__: train on one device."""

    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\\d+)?)$", description="cpu, cuda or cuda:N.")


class __C__Trainer(kinds.TrainerPlugin):
    """__NAME__: one device, AdamW, fp32."""

    name = "__NAME__"
    Options = __C__Options
    devices = ("cpu", "cuda")
    precisions = ("fp32",)

    def check(self, options: __C__Options, spec) -> None:
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(f"train.trainer.device: {options.device!r} needs a CUDA GPU, and none is available here. Use \\"cpu\\".")

    def train(self, options: __C__Options, job: kinds.TrainJob) -> None:
        spec, t = job.spec, job.spec.train
        device = torch.device(options.device)
        model = job.model.to(device)
        model.activation_checkpointing = t.activation_checkpointing
        seq_len = t.seq_len or model.config.block_size
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, t) / t.lr)
        start = 0
        if job.resume_from is not None:
            ckpt = open_checkpoint(job.resume_from)
            model.load_state_dict(ckpt.weights())
            state = ckpt.trainer_state()
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start = ckpt.step
        end = min(t.steps, job.stop_at or t.steps)

        def save(step: int, metrics: dict[str, float] | None = None) -> None:
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
            job.save_checkpoint(step, model_state(model), trainer_state, metrics)

        log = MetricsLog.for_run(job.run_dir, job.spec.train)
        model.train()
        try:
            for step in range(start, end):
                for micro in range(t.grad_accum):
                    x, y = train_batch(job.train_data, spec, step, micro, seq_len, device)
                    loss = model(x, y)
                    (loss / t.grad_accum).backward()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if done % t.log_every == 0:
                    log.write(step=done, loss=loss.item(), lr=lr)
                if t.checkpoint_every and done % t.checkpoint_every == 0 and done < end:
                    save(done)
            metrics = None
            if end == t.steps:
                metrics = evaluate(model, job.val_data, spec, seq_len, device)
                log.write(step=end, **metrics)
            if end > start or job.resume_from is None:
                save(end, metrics)
        finally:
            log.close()


@hookimpl
def aic_register_trainers(register):
    register(__C__Trainer)
'''
