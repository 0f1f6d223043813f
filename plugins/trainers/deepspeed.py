"""The DeepSpeed ZeRO trainer: stages 0-3 over the process group the core starts (gloo on the CPU, NCCL on CUDA),
the same batches, AdamW decay groups, warmup + cosine schedule and clipping as the `torch` trainer, and checkpoints
that hold both a consolidated `model.safetensors` (read without DeepSpeed) and DeepSpeed's own state for an exact
resume at the same world size.

DeepSpeed is an optional extra: this module imports without it (so `aic plugins` lists it) and `check` says how
to install it.

Checkpoints. aic writes checkpoints/step-N atomically (a temporary folder renamed into place, then `latest`
moves). DeepSpeed's state is written by every rank, so it cannot go through that single-writer path; it is
written first, by all ranks, into a staging folder checkpoints/.ds-step-N (complete once DeepSpeed's own
`latest` file is in it), then aic's checkpoint is written and `latest` moves, then rank 0 renames the staging
folder to checkpoints/step-N/deepspeed (one rename). A run killed between the two leaves the complete staging
folder beside step-N; `--resume` moves it in. A checkpoint without (or with a partial) DeepSpeed folder
resumes from its consolidated weights with a fresh optimizer, with a warning.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import importlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from aic_core.errors import SpecError, describe
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, TrainerPlugin, TrainJob
from aic_core.spec import RunSpec
from aic_core.train.checkpoint import model_state, open_checkpoint
from aic_core.train.common import (
    adamw,
    continue_schedule,
    lr_schedule,
    param_groups,
    resolve_device,
    restore_rng,
    rng_state,
)
from aic_core.train.distributed import launcher_world
from aic_core.train.loop import MicroBatches, TrainSteps
from aic_plugins.trainers.deepspeed_plan import ZeroPlan

INSTALL = (
    "the deepspeed trainer needs DeepSpeed, which is not installed here. Install it with "
    '`pip install --no-build-isolation "aic[deepspeed]"` '
    "(or `pip install --no-cache-dir --no-build-isolation deepspeed`): "
    "--no-build-isolation lets its setup see the torch already installed instead of fetching another. "
    'Or train with the "torch" trainer.'
)
DS_FOLDER = "deepspeed"  # checkpoints/step-N/deepspeed: DeepSpeed's own checkpoint
DS_TAG = "state"  # the tag (sub-folder) DeepSpeed writes under it

# Raw DeepSpeed keys that the spec already decides: where to set them instead.
SPEC_OWNED = {
    "train_batch_size": "train.batch_size x train.grad_accum",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum (each of N processes takes grad_accum / N micro-batches)",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr, train.beta1, train.beta2 and train.weight_decay (the trainer passes AdamW itself)",
    "scheduler": "train.lr, train.warmup_steps, train.min_lr and train.steps (warmup + cosine, as every aic trainer)",
    "bf16.enabled": "train.trainer.precision",
    "fp16.enabled": "train.trainer.precision",
    "zero_optimization.stage": "train.trainer.stage",
    "zero_optimization.offload_optimizer": "train.trainer.offload_optimizer",
    "zero_optimization.offload_param": "train.trainer.offload_params",
}


class DeepSpeedTrainerOptions(PluginOptions):
    """Train with DeepSpeed ZeRO (stages 0-3) over the processes of a launch."""

    stage: int = Field(
        2,
        ge=0,
        le=3,
        description="ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on CUDA, fp32 on the CPU. fp16 (CUDA only) uses DeepSpeed's dynamic loss scaling; "
        "tune it with config.fp16.",
    )
    offload_optimizer: bool = Field(False, description="Keep the optimizer states in CPU memory (stages 1-3).")
    offload_params: bool = Field(False, description="Keep the parameters in CPU memory (stage 3 only).")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    compile: bool = Field(False, description="torch.compile the model through DeepSpeed's engine.compile().")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config keys the spec does not model, merged into the generated config.",
    )


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise SpecError(f"train.trainer.type: {INSTALL}") from None
    return deepspeed


def _known_top_level_keys() -> set[str]:
    """Every config key name DeepSpeed's modules define as a constant: DeepSpeed itself ignores unknown top-level
    keys, so a typo there would otherwise pass silently."""
    names: set[str] = set()
    for module in (
        "deepspeed.runtime.constants",
        "deepspeed.runtime.zero.config",
        "deepspeed.runtime.activation_checkpointing.config",
        "deepspeed.monitor.config",
        "deepspeed.profiling.constants",
        "deepspeed.runtime.data_pipeline.constants",
        "deepspeed.compression.constants",
        "deepspeed.elasticity.constants",
        "deepspeed.autotuning.constants",
        "deepspeed.nebula.constants",
        "deepspeed.runtime.swap_tensor.constants",
        "deepspeed.checkpoint.constants",
        "deepspeed.runtime.config",
        "deepspeed.comm.constants",
        "deepspeed.runtime.precision_config",
    ):
        with contextlib.suppress(Exception):
            mod = importlib.import_module(module)
            names.update(v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str))
    return names


def _merge(base: dict[str, Any], extra: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        name = f"{path}{key}"
        owner = SPEC_OWNED.get(name)
        if owner is not None and (key not in base or base[key] != value):
            raise SpecError(
                f"train.trainer.config.{name}: the spec decides this DeepSpeed key (the trainer sets it from {owner}); "
                f"set that instead and remove '{name}' from train.trainer.config."
            )
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def _default_values() -> dict[str, Any]:
    """Config key names and DeepSpeed's default for each (its `NAME` and `NAME_DEFAULT` constants)."""
    from deepspeed.runtime import constants

    found: dict[str, list[Any]] = {}
    names = vars(constants)
    for name, key in names.items():
        default = names.get(f"{name}_DEFAULT")
        if name.isupper() and isinstance(key, str) and default is not None:
            found.setdefault(key, []).append(default)
    # A key name that several sections share ('enabled') has no one default: left to DeepSpeed.
    return {key: values[0] for key, values in found.items() if len({type(v) for v in values}) == 1}


def _check_types(extra: dict[str, Any], base: dict[str, Any], path: str = "", defaults: dict | None = None) -> None:
    """Raw config values of the kind the key's value has in aic's config or DeepSpeed's default: DeepSpeed's parser
    lets e.g. "steps_per_print": "x" through, and the first training step fails on it."""
    defaults = _default_values() if defaults is None else defaults
    for key, value in extra.items():
        name, like = f"{path}{key}", base[key] if key in base else defaults.get(key)
        if isinstance(value, dict) and (like is None or isinstance(like, dict)):
            _check_types(value, like or {}, f"{name}.", defaults)
            continue
        kinds = {bool: "true or false", int: "a number", float: "a number", dict: "an object"}  # strings vary
        expected = kinds.get(type(like))
        if expected is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"true or false": isinstance(value, bool), "a number": number}.get(expected, isinstance(value, type(like)))
        if not ok:
            raise SpecError(
                f"train.trainer.config.{name}: {json.dumps(value)} is not {expected}, which DeepSpeed expects here "
                f"(its value otherwise: {json.dumps(like)}); DeepSpeed would fail on it at the first step. "
                f"Give {expected}, or remove '{name}'."
            )


def _precision(options: DeepSpeedTrainerOptions, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if options.precision == "auto" else options.precision


def _world_size() -> int:
    try:
        return launcher_world()[1]
    except SpecError:
        return 1


def build_config(options: DeepSpeedTrainerOptions, spec: RunSpec, world: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config for this spec at this world size, with `options.config` merged in."""
    t = spec.train
    zero: dict[str, Any] = {"stage": options.stage}
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    # Offloaded, the optimizer still is torch's AdamW (the same math as every aic trainer; fused on the CPU), not
    # DeepSpeedCPUAdam, which needs a C++ build and differs in rounding: DeepSpeed asks for this key to allow it.
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": t.batch_size * t.grad_accum,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum // world,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": _precision(options, device) == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0), starting at 2^16 and halving on overflow; config.fp16 may tune it.
        "fp16": {"enabled": _precision(options, device) == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, passed in
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,  # aic logs; DeepSpeed's own step lines would repeat them
        "wall_clock_breakdown": False,
    }
    return _merge(config, options.config)


class DeepSpeedTrainer(ZeroPlan, TrainerPlugin):
    name = "deepspeed"
    Options = DeepSpeedTrainerOptions

    def check(self, options: DeepSpeedTrainerOptions, spec: RunSpec) -> None:
        if options.offload_params and options.stage != 3:
            raise SpecError(
                f"train.trainer.offload_params: parameter offload needs ZeRO stage 3 (stage is {options.stage}); set "
                "stage 3 or offload_params false."
            )
        if options.offload_optimizer and options.stage == 0:
            raise SpecError(
                "train.trainer.offload_optimizer: optimizer offload needs ZeRO stage 1, 2 or 3 (stage is 0)."
            )
        if options.compile and options.stage == 3:
            raise SpecError(
                "train.trainer.compile: DeepSpeed's engine.compile() cannot trace ZeRO-3's sharded parameters "
                "(torch.compile sees each parameter's empty local shard, and the first step fails). Use compile "
                "with stage 0, 1 or 2, or stage 3 with compile false."
            )
        if options.precision == "fp16" and self.device(options, 0).type != "cuda":
            raise SpecError(
                "train.trainer.precision: 'fp16' needs a CUDA device (DeepSpeed's fp16 optimizer and loss scaling "
                "run there); on the CPU train in 'fp32' (or leave it 'auto'), or 'bf16'."
            )
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(
                f"train.trainer.device: '{options.device}' was asked for, but no CUDA GPU is available here. Use "
                '"auto" or "cpu".'
            )
        # Raw keys the spec owns, before DeepSpeed is needed: the refusal reads the same with or without it.
        device = self.device(options, 0)
        world = _world_size()
        if spec.train.grad_accum % world:
            return  # the core refuses this (grad_accum must divide by the world size) with its own message
        config = build_config(options, spec, world, device)
        _deepspeed()
        unknown = sorted(set(options.config) - _known_top_level_keys())
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(_known_top_level_keys()), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpecError(
                f"train.trainer.config.{unknown[0]}: not a DeepSpeed config key{hint}; DeepSpeed would ignore it "
                "silently."
            )
        _check_types(options.config, build_config(options.model_copy(update={"config": {}}), spec, world, device))
        # DeepSpeed's own parser, before any process group: here it sees a world of 1, so give it one rank's share.
        from deepspeed.runtime.config import DeepSpeedConfig

        probe = {
            **config,
            "train_batch_size": config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"],
        }
        try:
            with _quiet_deepspeed():
                DeepSpeedConfig(probe)
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises pydantic errors, ValueError, AssertionError...
            raise SpecError(f"train.trainer.config: DeepSpeed rejects the config: {describe(exc)}") from None

    def device(self, options: DeepSpeedTrainerOptions, local_rank: int) -> torch.device:
        return resolve_device(options.device, local_rank)

    def build_model(self, options: DeepSpeedTrainerOptions, spec: RunSpec, dist, build):
        """Under ZeRO-3 with several processes, the model is built inside `deepspeed.zero.Init`: each parameter
        is sharded as soon as its module is made, and the weights are then drawn one module at a time on a
        gathered copy (`Transformer.init_weights`), so no process ever holds the whole model, and the seed gives
        the same weights as a plain build. A model with an adapter or `model.init_from` weights is built whole
        (on the CPU) and sharded by `deepspeed.initialize` instead: its weights come from elsewhere."""
        if options.stage != 3 or dist.world_size == 1 or spec.adapter is not None or spec.model.init_from:
            return build()
        deepspeed = _deepspeed()
        device = dist.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with _quiet_deepspeed():
            deepspeed.init_distributed(
                dist_backend="nccl" if device.type == "cuda" else "gloo", dist_init_required=False
            )
        config = build_config(options, spec, dist.world_size, device)
        with (
            _quiet_deepspeed(),
            deepspeed.zero.Init(config_dict_or_path=config, remote_device="cpu" if options.offload_params else None),
        ):
            model = build()
        model.init_weights(writing=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
        model.param_numel = _whole_numel  # the parameter count (`num_params`) of the whole model, not this shard
        return model

    def train(self, options: DeepSpeedTrainerOptions, job: TrainJob) -> None:
        deepspeed = _deepspeed()
        import torch.distributed as torch_dist

        dist = job.dist
        device = dist.device if dist.active else self.device(options, 0)
        own_group, env = False, {}
        if not torch_dist.is_initialized():  # one process, no launcher: DeepSpeed still wants a group (of one)
            own_group = True
            env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # DeepSpeed's engine asserts LOCAL_RANK is set
            torch_dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
        try:
            # DeepSpeed calls torch.distributed functions torch has renamed: one FutureWarning per call, every step.
            warnings.filterwarnings(
                "ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning
            )
            with _quiet_deepspeed():
                deepspeed.init_distributed(
                    dist_backend="nccl" if device.type == "cuda" else "gloo", dist_init_required=False
                )
            super().train(options, job)  # the core's loop over `steps`
        finally:
            if own_group and torch_dist.is_initialized():
                torch_dist.destroy_process_group()
                _forget_groups()
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def steps(self, options: DeepSpeedTrainerOptions, job: TrainJob) -> TrainSteps:
        """DeepSpeed's engine over the process group `train` makes sure of (call `train`, not this)."""
        device = job.dist.device if job.dist.active else self.device(options, 0)
        return _DeepSpeedSteps(_deepspeed(), options, job, device)


class _DeepSpeedSteps(TrainSteps):
    """DeepSpeed's engine: ZeRO's sharded optimizer, its own accumulation and clipping, its own checkpoints beside
    aic's (see the module's docstring)."""

    def __init__(self, deepspeed, options: DeepSpeedTrainerOptions, job: TrainJob, device: torch.device) -> None:
        spec, t, dist = job.spec, job.spec.train, job.dist
        super().__init__(device)  # autocast: none, DeepSpeed casts the model itself under bf16
        self.options, self.job = options, job
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.built_sharded = _sharded(job.model)  # by zero.Init (build_model), before deepspeed.initialize
        model = job.model if self.built_sharded else job.model.to(device)  # zero.Init placed its shards already
        config = build_config(options, spec, dist.world_size, device)
        self.ckpts = ckpts = Path(job.run_dir) / "checkpoints"

        # Resume: the consolidated weights always load first (a fresh optimizer starts from them if DeepSpeed's
        # state cannot be used); DeepSpeed's own state then replaces weights and optimizer exactly.
        state, ds_dir = None, None
        if job.resume_from is not None:
            ckpt = open_checkpoint(job.resume_from)
            _load_whole(model, ckpt.weights())
            state = ckpt.trainer_state()
            self.start = ckpt.step
            ds_dir = (
                dist.once(lambda: _find_ds_state(ckpt.path, ckpts)) if dist.active else _find_ds_state(ckpt.path, ckpts)
            )
            ds_dir = dist.gather(ds_dir)[0] if dist.active else ds_dir
            written_by = len(state.get("rng_ranks") or [None])
            why = None
            if ds_dir is None:
                why = f"{ckpt.path} holds no complete DeepSpeed state ({DS_FOLDER}/)"
            elif state.get("deepspeed", {}).get("world_size") != dist.world_size:
                why = f"{ckpt.path} was written by {written_by} process(es) and this run has {dist.world_size}"
            if why is not None:
                ds_dir = None
                warnings.warn(
                    f"--resume: {why}: training continues from its consolidated weights (model.safetensors) with the "
                    f"same schedule and data order, but AdamW's moments restart from zero and the per-rank random "
                    f"streams (dropout) restart, so the run does not continue bit for bit.",
                    stacklevel=2,
                )

        # DeepSpeed's ZeRO optimizers drop empty groups (LoRA trains no 1-D tensor), which the schedule must not count.
        groups = [g for g in param_groups(model, t.weight_decay, shape=_whole_shape) if g["params"]]
        # The torch trainer's AdamW (fused; offloaded, its states live on the CPU, where the fused kernel runs too).
        optimizer = adamw(model, t, device, groups)
        with _quiet_deepspeed():
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, t), config=config
            )
        self.scheduler = self.engine.lr_scheduler
        if options.compile:
            self.engine.compile()

        if state is not None:
            if ds_dir is not None:
                self.engine.checkpoint_engine.load = _load_without_pickle
                with _quiet_deepspeed():
                    path, _ = self.engine.load_checkpoint(
                        str(ds_dir), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                    )
                if path is None:
                    raise SpecError(
                        f"--resume: DeepSpeed could not read its state in {ds_dir}; resume from an earlier checkpoint."
                    )
            else:
                self.scheduler.load_state_dict(state["scheduler"])
            continue_schedule(self.scheduler)
            restore_rng(state, dist, spec.seed, self.start, per_rank=ds_dir is not None)
        dist.once(lambda: _clean_staging(ckpts))
        self.engine.train()

    def begin(self, log) -> None:
        if self.options.stage != 3:
            return
        dist, params = self.job.dist, list(self.engine.module.parameters())
        # What each process holds of the parameters: its shard (ds_tensor), about 1/N of each sharded tensor;
        # parameters below stage3_param_persistence_threshold stay whole on every process.
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        total = sum(_whole_numel(p) for p in params)
        shares = dist.gather(held) if dist.active else [held]
        log.write(event="zero", stage=3, params=total, params_held=shares, built_sharded=self.built_sharded)
        if dist.is_main:
            print(
                f"zero-3: each of {len(shares)} process(es) holds {max(shares) / total:.1%} of the {total:,} "
                f"parameters at most",
                file=sys.stderr,
            )

    def step(self, step: int, batches: MicroBatches) -> tuple[torch.Tensor, float]:
        engine = self.engine
        loss_sum = torch.zeros((), device=self.device)
        lr = self.scheduler.get_last_lr()[0]  # the schedule steps on the step's last micro-batch only
        for batch in batches:  # (inputs, targets) or (inputs, targets, documents)
            loss = engine(*batch)
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps and averages over ranks
            loss_sum += loss.detach().float()
            engine.step()  # steps the optimizer and the schedule on the step's last micro-batch only
        return loss_sum, lr

    def save(self, step: int, metrics: dict[str, float] | None) -> None:
        dist, ckpts, options = self.job.dist, self.ckpts, self.options
        staging = ckpts / f".ds-step-{step}"
        dist.once(lambda: (ckpts.mkdir(parents=True, exist_ok=True), shutil.rmtree(staging, ignore_errors=True)))
        with _quiet_deepspeed():
            self.engine.save_checkpoint(str(staging), tag=DS_TAG, client_state={"aic_step": step})
        dist.barrier()
        weights = consolidated(self.engine, options.stage, dist.is_main)
        trainer_state = {"rng": rng_state()}
        if dist.is_main:
            trainer_state.update(
                scheduler=self.scheduler.state_dict(),
                deepspeed={
                    "stage": options.stage,
                    "world_size": dist.world_size,
                    "precision": _precision(options, self.device),
                },
            )
        final = self.job.save_checkpoint(step, weights, trainer_state, metrics)
        dist.once(lambda: _move_in(staging, final))

    def eval_model(self) -> torch.nn.Module:
        # Under ZeRO-3 the module's forward gathers each layer's parameters, so this evaluates the full model.
        return self.engine.module

    def finish(self) -> None:
        # The eval and generate stages (rank 0 only) use job.model as a plain module: give it back whole, in fp32.
        full = consolidated(self.engine, self.options.stage, self.job.dist.is_main)
        self.engine.destroy()
        if full is not None:
            _restore(self.job.model, full, self.device)


def _whole_shape(p: torch.nn.Parameter) -> torch.Size:
    """A parameter's whole shape: under ZeRO-3 `p.shape` is that of the shard (ds_shape is the whole)."""
    return getattr(p, "ds_shape", p.shape)


def _whole_numel(p: torch.nn.Parameter) -> int:
    """A parameter's whole size: under ZeRO-3 `p.numel()` is that of the shard (ds_numel is the whole)."""
    return getattr(p, "ds_numel", p.numel())


def consolidated(engine, stage: int, keep: bool) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights as CPU tensors (on this rank if `keep`, else None). Every rank must call it: under
    ZeRO-3 gathering each parameter is a collective. In fp32 these are exactly the trained weights."""
    module = engine.module
    if stage == 3:
        import deepspeed

        # One module's parameters at a time, so no process holds the whole model on its device.
        out: dict[str, torch.Tensor] = {}
        for prefix, sub in module.named_modules():
            own = dict(sub.named_parameters(recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=None):
                if keep:
                    out.update(
                        {f"{prefix}.{n}" if prefix else n: p.detach().float().cpu().clone() for n, p in own.items()}
                    )
        if not keep:
            return None
        state = module.state_dict()  # parameters here are the shards; only the buffers are taken from it
        return {k: out[k] if k in out else state[k].detach().float().cpu().clone() for k in state}
    if not keep:
        return None
    return {k: v.float() for k, v in model_state(module).items()}


# The only Python objects (beyond tensors and containers) in DeepSpeed 0.19's checkpoints, stages 0-3, fp32/bf16/fp16,
# with and without offload: plain records whose constructors run no code of the file's choosing.
DS_SAFE_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _load_without_pickle(path: str, map_location=None):
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False), which runs whatever code a crafted
    file holds. Resuming, aic reads them instead with weights_only=True and an allow-list of DeepSpeed's record
    types, so a file that holds anything else is refused, not run."""
    allowed: list = []
    for name in DS_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), attr))
    enums = tuple(c for c in allowed if isinstance(c, type) and issubclass(c, enum.Enum))

    def enum_member(cls, name: str):
        """What `builtins.getattr` may do in these files: Python 3.11.0-3.11.4 pickle an enum member (ZeroStageEnum)
        as getattr(EnumClass, "name"). Only a member of an allowed enum is given; anything else is refused."""
        if cls in enums and isinstance(name, str) and name in cls.__members__:
            return cls[name]
        raise pickle.UnpicklingError(f"GLOBAL builtins.getattr on {cls!r}, {name!r}")

    allowed.append((enum_member, "builtins.getattr"))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = found.group(1) if found else "objects other than tensors"
        raise SpecError(
            f"--resume: {path} holds {what}, which aic does not unpickle (it could run code). DeepSpeed writes no such "
            "object, so the file was changed after it was written. Resume from an earlier checkpoint, or start a "
            "new run with model.init_from set to this checkpoint folder (its model.safetensors holds no code)."
        ) from None


def _sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _load_whole(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """load_state_dict, for a model whose parameters zero.Init has sharded too (one module at a time)."""
    if not _sharded(model):
        model.load_state_dict(weights)
        return
    import deepspeed

    missing = set(model.state_dict()) - set(weights)
    if missing:
        raise SpecError(
            f"--resume: the checkpoint's weights lack {', '.join(sorted(missing)[:5])}; it was written for another "
            "model."
        )
    for prefix, sub in model.named_modules():
        own = dict(sub.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0), torch.no_grad():
            for name, p in own.items():
                p.copy_(weights[f"{prefix}.{name}" if prefix else name])
            for name, b in sub.named_buffers(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                if key in weights:
                    b.copy_(weights[key])


def _restore(model: torch.nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Replace the model's (possibly ZeRO-3 partitioned) parameters by plain ones holding `full`; tied parameters
    stay tied."""
    new: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in new:
                key = f"{module_name}.{name}" if module_name else name
                new[id(param)] = torch.nn.Parameter(full[key].to(device), requires_grad=param.requires_grad)
            module._parameters[name] = new[id(param)]
    model.load_state_dict(full)  # buffers too; checks that every tensor is there


def _forget_groups() -> None:
    """DeepSpeed caches the process groups it made (deepspeed.utils.groups) and its comm backend; after the group
    of one this trainer started is destroyed, a later run in the same process must not reuse them."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.isupper() and ("_GROUP" in name or name.startswith("_MPU_")):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    ds_comm.cdb = None


def _find_ds_state(ckpt_path: Path, ckpts: Path) -> str | None:
    """The checkpoint's complete DeepSpeed folder, moving in a complete staging folder a killed run left."""
    inside = Path(ckpt_path) / DS_FOLDER
    if (inside / "latest").is_file():
        return str(inside)
    staging = ckpts / f".ds-{Path(ckpt_path).name}"
    if (staging / "latest").is_file() and not inside.exists():
        os.replace(staging, inside)
        return str(inside)
    return None


def _move_in(staging: Path, final: Path | None) -> None:
    if final is None:
        return
    target = Path(final) / DS_FOLDER
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def _clean_staging(ckpts: Path) -> None:
    """Staging folders of checkpoints that were never completed (a run killed while saving)."""
    if ckpts.is_dir():
        for d in ckpts.glob(".ds-step-*"):
            shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs its config and each save at INFO; aic's output stays aic's."""
    import logging

    try:
        from deepspeed.utils import logger
    except ImportError:
        yield
        return
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@hookimpl
def aic_register_trainers(register):
    register(DeepSpeedTrainer)
