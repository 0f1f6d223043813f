"""The five plugin kinds: the base classes a plugin subclasses and the interfaces the core calls.

A plugin is a class with a `name`, an `Options` Pydantic model (extra="forbid") and the factory
methods of its kind. Plugins are registered through the hooks in `hookspecs.py`; the core creates
one instance of each class and calls its methods with validated options.

This module does not import torch itself: a tokenizer plugin subclasses these bases without torch, so the
data stage's worker processes, which unpickle the tokenizer, start in a fraction of the time and memory.
`Positional`, `Transformer`, `TransformerConfig`, `TrainSteps` and `MicroBatches` are importable from here all
the same (loaded on first use).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from aic_core.errors import PluginError, SpecError
from aic_core.plugins import KINDS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from aic_core.model.nn.positional import Positional
    from aic_core.model.nn.transformer import Transformer, TransformerConfig
    from aic_core.plan.columns import MemoryInputs, Strategy
    from aic_core.plan.shape import AdapterLayer
    from aic_core.spec import RunSpec
    from aic_core.train.distributed import Dist
    from aic_core.train.loop import TrainSteps

# Names of the torch side, imported when first asked for (`from aic_core.kinds import Positional` works as before).
_LAZY = {
    "Positional": "aic_core.model.nn.positional",
    "Transformer": "aic_core.model.nn.transformer",
    "TransformerConfig": "aic_core.model.nn.transformer",
    "TrainSteps": "aic_core.train.loop",
    "MicroBatches": "aic_core.train.loop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _new_dist() -> Dist:
    from aic_core.train.distributed import Dist

    return Dist()


class PluginOptions(BaseModel):
    """Base for every plugin's options: unknown keys are errors, and types are strict (a JSON `true` is not
    the integer 1, "4" is not 4; a JSON int may still fill a float)."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


class Plugin(ABC):
    kind: ClassVar[str]
    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def check(self, options: PluginOptions, spec: RunSpec) -> None:  # noqa: B027 - optional, empty by default
        """Refuse, with a SpecError or PluginError, a spec this plugin cannot serve. Called before any work."""

    @classmethod
    def unimplemented(cls) -> str | None:
        """What the class still lacks beyond its abstract methods, where a kind asks for one of several methods
        (a trainer: `steps` or `train`); None when it is complete. The registry refuses an incomplete class."""
        return None


# --- positional encodings ---------------------------------------------------------------------
# `Positional`, the interface attention calls, lives in aic_core/nn/positional.py (nn/ needs it and kinds builds
# on nn/); it is imported here so that plugins import every interface from this module.


class PositionalPlugin(Plugin):
    kind = "positional"
    # Capabilities the core checks before any work starts.
    extrapolates: ClassVar[bool] = False  # works past the trained context length
    supports_kv_cache: ClassVar[bool] = True

    @abstractmethod
    def build(self, options: PluginOptions, config: TransformerConfig) -> Positional: ...

    def plan_cache_bytes(self, options: PluginOptions, config: TransformerConfig, batch_size: int, seq_len: int) -> int:
        """For `aic plan`: the bytes of what this encoding computes once per forward of a (batch_size, seq_len)
        micro-batch and every layer's backward pass keeps (RoPE: its float32 cos and sin tables). Its parameters
        and registered buffers are counted with the model's; default 0."""
        return 0


# --- models ---------------------------------------------------------------------------------------


class ModelPlugin(Plugin):
    kind = "model"
    default_positional: ClassVar[str] = "learned"

    @abstractmethod
    def config(self, options: PluginOptions, vocab_size: int) -> TransformerConfig:
        """The transformer's shape for these options. `vocab_size` is the tokenizer's, used when the
        options leave it unset."""

    def build(self, options: PluginOptions, config: TransformerConfig, positional: Positional) -> Transformer:
        from aic_core.model.nn.transformer import Transformer

        return Transformer(config, positional)

    # Hugging Face interop. A family that has an HF counterpart overrides these.
    hf_architectures: ClassVar[tuple[str, ...]] = ()

    def options_from_hf_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        raise PluginError(
            f"model '{self.name}' has no Hugging Face counterpart; use a model whose plugin lists hf_architectures"
        )

    def positional_from_hf_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """The model.positional section for an HF config (default: this family's positional, default options)."""
        return {"type": self.default_positional}

    def state_dict_from_hf(
        self, hf_state: dict[str, torch.Tensor], config: TransformerConfig
    ) -> dict[str, torch.Tensor]:
        raise PluginError(
            f"model '{self.name}' has no Hugging Face counterpart; use a model whose plugin lists hf_architectures"
        )

    # HF's layers store weights as (in, out) (GPT-2's Conv1D): PEFT's fan_in_fan_out.
    hf_fan_in_fan_out: ClassVar[bool] = False

    def hf_linear_map(self, config: TransformerConfig) -> dict[str, list[tuple[str, int, int]]]:
        """Each aic linear layer -> the HF layers it holds: [(HF module name, first output row, end row)].
        Fused layers (qkv, gate|up) map to several. Used to export adapters in PEFT's format."""
        raise PluginError(
            f"model '{self.name}' has no Hugging Face counterpart, so its adapters cannot be exported in PEFT's format"
        )

    def hf_config(self, options: PluginOptions, config: TransformerConfig) -> dict[str, Any]:
        """The config.json of the HF counterpart for these options (`options.positional` included).
        Raise PluginError naming what would be lost when HF cannot represent the model."""
        raise PluginError(
            f"model '{self.name}' has no Hugging Face counterpart, so it cannot be exported to the HF format; "
            f"keep it in aic's format (its checkpoints load with `aic generate`)"
        )

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
        """aic tensors (vocabulary padded) -> the HF counterpart's tensors (vocabulary cut to vocab_size)."""
        raise PluginError(
            f"model '{self.name}' has no Hugging Face counterpart, so it cannot be exported to the HF format"
        )


# --- tokenizers -----------------------------------------------------------------------------------


class Tokenizer(ABC):
    """A loaded tokenizer. `encode` reads text as text: the characters of a special token ("<|user|>", the eos's
    "<|endoftext|>") typed in a document or a prompt are ordinary characters and never give that token's id.
    `encode_with_special` is how a caller asks for special tokens (tiktoken's `allowed_special`): a chat template's
    rendering, where aic itself writes them."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    # Every token that has a text but that `encode` never produces from it: text -> id (the tokenizer's specials,
    # and its bos/eos/pad where they have a text). Default: none.
    special_ids: dict[str, int] = {}  # a read-only class default; plugins set their own

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_with_special(self, text: str, allowed_special: Collection[str] | str = "all") -> list[int]:
        """As `encode`, except that where text holds an allowed special token ("all": every one of `special_ids`),
        it gives that token's id. The longest special wins where two start at the same place."""
        allowed = self.special_ids if allowed_special == "all" else list(allowed_special)
        unknown = [t for t in allowed if t not in self.special_ids]
        if unknown:
            known = ", ".join(sorted(self.special_ids)) or "none"
            raise SpecError(
                f"allowed_special: {unknown[0]!r} is not a special token of this tokenizer (it has: {known}). "
                "Add it to tokenizer.special_tokens and train the tokenizer again, or leave it out."
            )
        if not allowed:
            return self.encode(text)
        pattern = re.compile("|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                ids += self.encode(text[start : match.start()])
            ids.append(self.special_ids[match.group()])
            start = match.end()
        if start < len(text):
            ids += self.encode(text[start:])
        return ids

    def roles(self) -> dict[str, Any]:
        """What a checkpoint records of this tokenizer's token roles, and every export carries: the ids of bos, eos
        and pad (None where there is none) and of the special tokens."""
        return {
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "special_ids": dict(self.special_ids),
        }


def check_special_tokens(tokens: list[str]) -> list[str]:
    """For a tokenizer plugin's `special_tokens` validator: none empty, none listed twice (ValueError otherwise)."""
    seen: set[str] = set()
    for token in tokens:
        if not token:
            raise ValueError("a special token cannot be the empty string")
        if token in seen:
            raise ValueError(f"special token {token!r} is listed twice")
        seen.add(token)
    return tokens


class TokenizerPlugin(Plugin):
    kind = "tokenizer"
    trains: ClassVar[bool] = True  # False for tokenizers that need no training (byte-level)
    # File names under which a Hugging Face model folder carries this tokenizer (sentencepiece: "tokenizer.model";
    # bpe: "tokenizer.json", "vocab.json"). Any one present says the folder holds it, and import reads it with
    # `from_hf_folder`; export copies the tokenizer file under the first name.
    hf_files: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def train(self, options: PluginOptions, files: list[Path], path: Path) -> Tokenizer:
        """Train on the corpus files and write the tokenizer to the single file `path`."""

    @abstractmethod
    def load(self, options: PluginOptions, path: Path) -> Tokenizer:
        """Load the tokenizer file `path` written by `train`."""

    def planned_special_tokens(self, options: PluginOptions) -> list[str] | None:
        """The special tokens a tokenizer trained with these options will have (their text), so that the core can
        refuse, before any work, a spec whose chat template needs others. Default: None, the plugin does not say."""
        return None

    def from_hf_folder(self, folder: Path) -> tuple[dict[str, Any], bytes]:
        """This tokenizer from a Hugging Face model folder that holds one of `hf_files`: its options (what the folder's
        other files say, e.g. tokenizer_config.json's bos/eos tokens) and the contents of its one file, which `load`
        then reads. Default: the first of `hf_files` present, as it is, with default options."""
        for name in self.hf_files:
            if (Path(folder) / name).is_file():
                return {}, (Path(folder) / name).read_bytes()
        raise PluginError(f"{folder}: holds none of {', '.join(self.hf_files)}")

    def hf_tokenizer_files(self, options: PluginOptions, path: Path, model_max_length: int) -> dict[str, bytes]:
        """Files (name -> contents) that `aic export --format hf` writes beside the `hf_files` copy of `path`, so
        that `transformers.AutoTokenizer.from_pretrained(folder)` gives exactly this tokenizer's ids and text
        (tokenizer.json, tokenizer_config.json, ...). The export checks that on fixed texts when transformers is
        installed. Where some files cannot be made, return the others and `warnings.warn` why: the export
        report shows it, and skips the check. Default: none."""
        return {}


# --- adapters -------------------------------------------------------------------------------------


class AdapterPlugin(Plugin):
    kind = "adapter"

    @abstractmethod
    def apply(self, model: nn.Module, options: PluginOptions) -> list[str]:
        """Wrap the targeted modules in place, freeze the base; return the names of the wrapped modules.
        The base's tensors keep their names, so a base checkpoint loads into the wrapped model."""

    @abstractmethod
    def merge(self, model: nn.Module) -> None:
        """Fold the adapters into the base weights in place (the forward then skips them)."""

    @abstractmethod
    def unmerge(self, model: nn.Module) -> None:
        """Undo `merge`, restoring the base weights exactly."""

    @abstractmethod
    def remove(self, model: nn.Module) -> None:
        """Merge, then replace each wrapped module by a plain one: the model no longer holds an adapter."""

    @abstractmethod
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's own tensors (CPU), named as in the model's state dict."""

    def plan_layers(
        self, options: PluginOptions, linears: dict[str, tuple[int, int]]
    ) -> dict[str, AdapterLayer] | None:
        """For `aic plan`, which counts the model without building it: `linears` maps each linear layer of the
        model ("blocks.3.attn.qkv", "lm_head") to its (in_features, out_features); return, for each one `apply`
        would wrap, what it adds (`aic_core.plan.shape.AdapterLayer`: its trainable tensors, what its branch saves
        for the backward pass, the autocast copies it keeps), and raise as `apply` would for targets that match
        nothing. The plan takes the base as frozen, as `apply` leaves it. Default: None, the adapter does not say (the
        plan then counts the frozen base alone, and says so)."""
        return None

    def to_peft(
        self,
        model: nn.Module,
        options: PluginOptions,
        linear_map: dict[str, list[tuple[str, int, int]]],
        fan_in_fan_out: bool,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's adapter_config.json and adapter_model.safetensors tensors. `linear_map` maps an aic linear
        layer to the HF layers it holds: [(HF module name, first output row, end row)]."""
        raise PluginError(f"adapter '{self.name}' has no PEFT counterpart, so it cannot be exported in PEFT's format")


# --- trainers -------------------------------------------------------------------------------------


@dataclass
class TrainJob:
    """Everything a trainer needs; built by the core's run pipeline."""

    spec: RunSpec
    resolved_spec: dict[str, Any]
    model: Transformer
    train_data: Any  # aic_core.data.tokens.TokenData
    val_data: Any  # aic_core.data.tokens.TokenData
    run_dir: Path
    tokenizer_path: Path
    tokenizer_hash: str
    resume_from: Path | None = None  # a checkpoint folder to continue from exactly
    stop_at: int | None = None  # stop (with a checkpoint) after this step, before train.steps
    adapter: AdapterPlugin | None = None  # the spec's adapter plugin: its files go into every checkpoint
    # This process's place in the launch (rank, world size, device); one process: rank 0 of 1. The global
    # batch is train.batch_size x train.grad_accum whatever the world size: each rank takes grad_accum / world
    # micro-batches (training.train_batch picks which). After `train` returns, `model` holds the final weights
    # on every rank (a trainer that shards them gathers them back), for the eval and generate stages.
    dist: Dist = field(default_factory=_new_dist)
    tokens: dict[str, Any] | None = None  # the tokenizer's roles (Tokenizer.roles), recorded in every checkpoint
    _writer: Any = field(default=None, repr=False)  # a train.checkpoint.CheckpointWriter, made at the first save

    def save_checkpoint(
        self,
        step: int,
        weights: dict[str, torch.Tensor] | None,
        trainer_state: dict[str, Any] | None,
        metrics: dict[str, float] | None = None,
    ) -> Path | None:
        """Write checkpoints/step-N atomically, with the spec, tokenizer and its hash (the one layout every trainer
        uses; `aic_core.train.checkpoint.CheckpointWriter`). The first call removes what killed runs left behind;
        with train.keep_last, older checkpoints beyond the newest keep_last are deleted after each save (never
        `latest` nor the checkpoint this run resumed from).

        With several processes every rank calls it (ranks other than 0 may pass weights None and a trainer state
        holding only their "rng"): each rank's "rng" is collected into "rng_ranks", and rank 0 writes."""
        if self._writer is None:
            from aic_core.train.checkpoint import CheckpointWriter

            self._writer = CheckpointWriter(
                self.run_dir,
                self.resolved_spec,
                self.tokenizer_path,
                self.tokenizer_hash,
                self.model,
                self.adapter,
                keep_last=self.spec.train.keep_last,
                keep=[self.resume_from] if self.resume_from else [],
                tokens=self.tokens,
            )
        if self.dist.active:
            rngs = self.dist.gather((trainer_state or {}).get("rng"))
            if self.dist.is_main and trainer_state is not None:
                trainer_state = {**trainer_state, "rng_ranks": rngs}
            return self.dist.once(lambda: self._writer.write(step, weights, trainer_state, metrics))
        return self._writer.write(step, weights, trainer_state, metrics)


class TrainerPlugin(Plugin):
    kind = "trainer"
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")

    def plan_memory(self, options: PluginOptions | None, inputs: MemoryInputs) -> list[Strategy]:
        """For `aic plan`: what this trainer keeps per device (weights, gradients, optimizer state, its buffers)
        at `inputs.world_size`, one column (`aic_core.plan.columns.Strategy`) per way it trains; `aic plan` shows
        every installed trainer's columns. `inputs` (`aic_core.plan.columns.MemoryInputs`) is what the core counted:
        the model's elements, the micro-batch, device, precision; `inputs.column(...)` adds the activations, the
        loss buffer and the CUDA workspaces to the states given and finds the peak. `options`: the spec's, when the
        spec trains with this plugin, else None. A column with `fallback=True` is not shown: the fit advice offers
        it (by its `advice` text) when no shown column fits. Default: the core's column, plain PyTorch on one
        process and DDP on several (the torch trainer's)."""
        from aic_core.plan.columns import data_parallel_column

        return [data_parallel_column(inputs)]

    def plan_column(self, options: PluginOptions, world_size: int) -> str | None:
        """For `aic plan`: the name of the column a run with these options trains with (one of `plan_memory`'s,
        or the core's "torch" / "ddp", `aic_core.plan.columns.data_parallel_name(world_size)`); default None: the
        first `plan_memory` returns."""
        return None

    def device(self, options: PluginOptions, local_rank: int) -> torch.device:
        """The device this process trains on; under a launcher, LOCAL_RANK picks the GPU. The core starts the
        process group for it (NCCL for CUDA, gloo for the CPU) before `train`."""
        from aic_core.devices import resolve_device

        return resolve_device("auto", local_rank)

    def build_model(
        self, options: PluginOptions, spec: RunSpec, dist: Dist, build: Callable[[], Transformer]
    ) -> Transformer:
        """Build the model to train: `build()` is the core's recipe (model plugin, positional plugin, weights,
        adapter). A trainer that shards parameters while they are created (DeepSpeed's ZeRO-3 `zero.Init`)
        calls it inside its own context; the default just calls it."""
        return build()

    def steps(self, options: PluginOptions, job: TrainJob) -> TrainSteps:
        """Set up training (the model on its device, the optimizer and schedule, and on `job.resume_from` their
        saved state) and return what the core's training loop needs from this trainer: how to take one step over
        this rank's micro-batches, how to save at a step, which module to evaluate (`TrainSteps`, in
        aic_core.train.loop). The loop does the rest: logging, evaluation and checkpoint cadence, Ctrl-C, the
        final evaluation and save. A trainer implements this, or `train` with a loop of its own."""
        raise NotImplementedError(f"trainer '{self.name}' implements neither steps() nor train()")

    def train(self, options: PluginOptions, job: TrainJob) -> None:
        """Train, evaluating and checkpointing into `job.run_dir` as the spec says. Default: the core's loop
        (`aic_core.train.loop.train_loop`) over `steps`. A trainer may override this to wrap it (DeepSpeed starts
        a process group around it) or to run a loop of its own."""
        from aic_core.train.loop import train_loop

        train_loop(job, self.steps(options, job))

    @classmethod
    def unimplemented(cls) -> str | None:
        if cls.steps is TrainerPlugin.steps and cls.train is TrainerPlugin.train:
            return "steps() (the core's training loop runs the steps it returns) or train() (a loop of its own)"
        return None


# {kind: its base class}, keyed and ordered by KINDS (aic_core.plugins holds the one list of kinds).
_BASES = {base.kind: base for base in (ModelPlugin, PositionalPlugin, AdapterPlugin, TokenizerPlugin, TrainerPlugin)}
BASES: dict[str, type[Plugin]] = {kind: _BASES[kind] for kind in KINDS}
