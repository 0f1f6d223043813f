"""The pipeline behind `aic run`: tokenizer -> train -> eval -> generate, into one run directory.

run_dir/spec.resolved.json   the spec with defaults filled in, and versions
run_dir/tokenizer.model      the trained tokenizer
run_dir/checkpoints/step-N/  weights, trainer state, state.json, tokenizer copy
run_dir/metrics.jsonl        training loss, validation metrics
run_dir/eval.json            the eval stage's result
run_dir/samples.txt          the generate stage's samples
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from aic_core.data.sample import sample_corpus
from aic_core.data.tokens import (
    ReadOptions,
    check_cache_dir,
    check_data_files,
    load_splits,
    token_cache_dir,
    tokenizer_corpus,
)
from aic_core.errors import (
    AicError,
    CheckpointError,
    DataError,
    Interrupted,
    SpecError,
    did_you_mean,
)
from aic_core.files import file_sha256
from aic_core.generate import generate
from aic_core.model.loading import (
    Loaded,
    ModelSource,
    build_model,
    load_checkpoint_model,
    load_spec_with_source,
    load_tokenizer,
    open_source,
)
from aic_core.model.nn.transformer import Transformer
from aic_core.plan.memory import check_fits
from aic_core.plan.shape import count_model
from aic_core.plugins.kinds import AdapterPlugin, Tokenizer, TrainerPlugin, TrainJob
from aic_core.plugins.registry import Registry, get_registry
from aic_core.report import write_report
from aic_core.spec import RunSpec, resolved_dict, warn_surprises
from aic_core.train.checkpoint import (
    Checkpoint,
    disk_full_error,
    is_disk_full,
    latest_checkpoint,
    open_checkpoint,
    write_atomic,
    write_json,
)
from aic_core.train.common import MetricsLog, evaluate, resolve_device
from aic_core.train.distributed import Dist, launcher_world, setup

STAGES = ("tokenizer", "train", "eval", "generate")
TOKENIZER_FILE = "tokenizer.model"
LOCK_FILE = ".aic.lock"


def _diff(a: Any, b: Any, path: str = "", spec: Any = None) -> list[str]:
    """What changed from `b` (a checkpoint's resolved spec, or part of it) to `a` (this run's), as "path: old -> new".
    `spec` is the spec object `a` was dumped from, when known: then a key `b` lacks is no change if `a` holds that
    field's default, for it is an option a newer aic added, which the checkpoint's aic did not write."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in b and _holds_default(spec, key):
                continue
            sub = getattr(spec, key, None) if isinstance(spec, BaseModel) else None
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key, sub)
        return out
    return [] if a == b else [f"{path}: {b!r} -> {a!r}"]


def _holds_default(spec: Any, key: str) -> bool:
    """Whether the spec object's field `key` has a default and holds it."""
    field = type(spec).model_fields.get(key) if isinstance(spec, BaseModel) else None
    if field is None or field.is_required():
        return False
    return getattr(spec, key) == field.get_default(call_default_factory=True)


# What a resumed run may change without breaking exactness: bookkeeping, not the math of the steps done.
RESUME_FREE = {
    "train.checkpoint_every",
    "train.log_every",
    "train.keep_last",
    "train.log_to",
    "train.activation_checkpointing",
    "train.trainer.compile",
    "train.trainer.device",
}


# What shapes how a run's tokenizer file is trained, not the file a run with checkpoints reuses or the model: free
# to differ from a checkpoint's (whose aic may not have had it).
MODEL_FREE = {"tokenizer.sample_bytes"}


def _model_changes(
    spec_dict: dict[str, Any], old: dict[str, Any], spec: RunSpec | None = None
) -> tuple[str, list[str]] | None:
    """The first of the model, tokenizer and adapter sections that differs from a checkpoint's, with its changes.
    With `spec` (the object `spec_dict` was dumped from), an option the checkpoint lacks that holds its default is
    no change."""
    for section in ("model", "tokenizer", "adapter"):
        changes = _diff(spec_dict.get(section), old.get(section), section, getattr(spec, section, None))
        if changes := [c for c in changes if c.split(":")[0] not in MODEL_FREE]:
            return section, changes
    return None


def _check_resume(
    spec_dict: dict[str, Any], ckpt: Checkpoint, echo: Callable[[str], None], spec: RunSpec | None = None
) -> None:
    """--resume continues the run the checkpoint belongs to: the model, tokenizer, data, seed and every training
    setting that shapes the steps must be as they were; only train.steps may grow (and bookkeeping change). With
    `spec` (the object `spec_dict` was dumped from), an option the checkpoint lacks that holds its default is no
    change."""
    old = ckpt.state["spec"]
    if changed := _model_changes(spec_dict, old, spec):
        section, changes = changed
        raise CheckpointError(
            f"--resume: the spec's {section} section differs from checkpoint {ckpt.path} ({'; '.join(changes[:6])}). "
            "A run resumes with the model it was trained with: undo the change, "
            "or start a new run (a new name or output_dir)."
        )
    changes = [
        c
        for key in ("seed", "data", "train")
        for c in _diff(spec_dict.get(key), old.get(key), key, getattr(spec, key, None))
    ]
    changes = [
        c
        for c in changes
        if c.split(":")[0] not in RESUME_FREE and not c.startswith(("data.cache_dir:", "data.workers:"))
    ]
    steps = [c for c in changes if c.startswith("train.steps:")]
    changes = [c for c in changes if not c.startswith("train.steps:")]
    trainer = [c for c in changes if c.startswith("train.trainer.")]
    if trainer:
        raise CheckpointError(
            f"--resume: the spec changes the trainer checkpoint {ckpt.path.name} was written by "
            f"({'; '.join(trainer[:4])}). "
            f"Its optimizer state is in that trainer's layout (a ZeRO stage shards it differently), so the run cannot "
            f"continue exactly under the new setting. Undo the change to resume; or, to go on from these weights with "
            f'the new setting, start a new run with "model": {{"init_from": "{ckpt.path}"}} (the weights carry over; '
            f"AdamW's moments and the learning-rate schedule start afresh)."
        )
    if changes:
        raise CheckpointError(
            f"--resume: the spec changes what checkpoint {ckpt.path.name} was trained with ({'; '.join(changes[:6])}), "
            "so the resumed run would not continue it exactly. Undo the change, or start a new run (a new name or "
            "output_dir). A resumed run may raise train.steps and change checkpoint_every, log_every, keep_last, "
            "log_to, activation_checkpointing, trainer.device and trainer.compile."
        )
    old_steps, new_steps = int(old["train"]["steps"]), int(spec_dict["train"]["steps"])
    if steps and new_steps < old_steps:
        raise CheckpointError(
            f"--resume: train.steps is {new_steps}, fewer than the {old_steps} this run was started with; "
            f"a run's schedule cannot shrink. To stop early, keep train.steps at {old_steps} and pass --stop-at N."
        )
    if steps:
        echo(
            f"resume: train.steps {old_steps} -> {new_steps}: the learning-rate schedule is stretched from step "
            f"{ckpt.step} on (steps already done followed the {old_steps}-step schedule, "
            f"so this is not a straight {new_steps}-step run)"
        )


def _check_same_model(
    spec_dict: dict[str, Any], ckpt: Checkpoint, stages: list[str], spec: RunSpec | None = None
) -> None:
    """Stages that use a trained checkpoint (eval, generate) need the spec to describe its model."""
    if changed := _model_changes(spec_dict, ckpt.state["spec"], spec):
        section, changes = changed
        raise CheckpointError(
            f"--stage {','.join(stages)}: the spec's {section} section differs from the model in {ckpt.path} "
            f"({'; '.join(changes[:6])}), which these stages would use. Undo the change, or train it as a new run "
            f"(a new name or output_dir)."
        )


def _check_run_dir(run_dir: Path) -> None:
    """The run directory must be a folder aic can write, before any work."""
    where = f"{run_dir} (output_dir, default runs/<name>)"
    if run_dir.exists() and not run_dir.is_dir():
        raise SpecError(
            f"output_dir: {where} is a file, not a folder. Set output_dir to a folder, or move the file away."
        )
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise SpecError(
            f"output_dir: {where}: {existing} is a file, so the folder cannot be made. Choose another output_dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(
            f"output_dir: {where}: {existing} is not writable by this user. "
            "Choose another output_dir or fix its permissions."
        )


def _check_writable(run_dir: Path, stages: list[str]) -> None:
    """What the stages will write into, before any work: a read-only checkpoints/ found only after the steps are
    trained would cost those steps. (The run directory itself is checked by _check_run_dir.)"""
    parts = {"metrics.jsonl": "the metrics log"} if {"train", "eval"} & set(stages) else {}
    if "train" in stages:
        parts |= {"checkpoints": "checkpoints", "tensorboard": "TensorBoard events"}
    for name, what in parts.items():
        path = run_dir / name
        mode = os.W_OK | (os.X_OK if path.is_dir() else 0)
        if path.exists() and not os.access(path, mode):
            raise CheckpointError(
                f"{path}: not writable by this user, and this run writes {what} there; nothing was changed. "
                f"Make it writable (chmod -R u+w {shlex.quote(str(path))}), or run as the user who owns the run."
            )


def _open_run_dir(run_dir: Path, lock: RunLock) -> None:
    """Make the run directory and take its lock; a folder that cannot be made or written is the output_dir's fault."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(
            f"output_dir: {run_dir}: the run directory cannot be made ({exc.strerror or exc}). Choose an output_dir "
            "(or --output-dir) on a disk this user can write."
        ) from None
    try:
        lock.__enter__()
    except OSError as exc:
        raise SpecError(
            f"output_dir: {run_dir}: cannot write {lock.path.name} there ({exc.strerror or exc}). Choose an output_dir "
            "(or --output-dir) on a disk this user can write, or fix the folder's permissions."
        ) from None


class RunLock:
    """One `aic run` at a time on a run directory: an exclusive flock on run_dir/.aic.lock, held for the run and
    released by the kernel if the process dies. The holder's PID is written into the file for the refusal."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent}: another `aic run` (PID {holder}) is using this run directory; "
                "nothing was changed. Wait for it to finish (or stop it), or give this run a new name or output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _check_stop_at(stop_at: int | None, spec: RunSpec, ckpt: Checkpoint | None) -> None:
    if stop_at is None:
        return
    if stop_at < 1:
        raise SpecError(f"--stop-at: {stop_at} is not a step; give a step from 1 to train.steps ({spec.train.steps}).")
    if stop_at > spec.train.steps:
        raise SpecError(
            f"--stop-at: {stop_at} is past train.steps ({spec.train.steps}), where training ends anyway. "
            f"Give a step from 1 to {spec.train.steps}, or raise train.steps."
        )
    if ckpt is not None and stop_at <= ckpt.step:
        raise SpecError(
            f"--stop-at: {stop_at}, but the run's latest checkpoint is already at step {ckpt.step}. "
            f"Give a step after {ckpt.step} (up to {spec.train.steps})."
        )


def _stages(stages: Sequence[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    for s in stages:
        if s not in STAGES:
            raise SpecError(f"--stage: unknown stage '{s}'{did_you_mean(s, STAGES)}. Stages: {', '.join(STAGES)}.")
    return [s for s in STAGES if s in stages]


def run(
    spec_path: str | Path,
    stages: Sequence[str] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    registry: Registry | None = None,
    echo: Callable[[str], None] = print,
    output_dir: str | Path | None = None,
) -> Path:
    """Run the stages of a spec (into `output_dir` if given, else the spec's); return the run directory. Everything
    that can be checked is checked before anything in the run directory is written and before a process group
    starts. Under torchrun or deepspeed, every process runs this; rank 0 does the work that happens once and writes
    every file. The stages share one RunContext: each file is read and each model built once."""
    registry = registry or get_registry()
    world = launcher_world()
    spec, source = load_spec_with_source(spec_path, registry)
    if output_dir is not None:
        spec.output_dir = str(output_dir)  # the resolved spec and checkpoints record where the run really is
    if world[0] == 0:
        warn_surprises(spec)
    stages = _stages(stages)
    run_dir = spec.run_dir
    _check_run_dir(run_dir)
    check_data_files(spec.data)  # missing, a folder, unreadable or empty: named as data.train[i] / data.val[i]
    if "train" in stages:
        check_cache_dir(token_cache_dir(spec.data.cache_dir))  # a file in its place: said before any work
    if stop_at is not None and "train" not in stages:
        raise SpecError(f"--stop-at: only applies to the train stage, which is not among --stage {','.join(stages)}.")
    _check_stop_at(stop_at, spec, None)
    trainer = registry.get("trainer", spec.train.trainer.type)
    device = trainer.device(spec.train.trainer, world[2])
    _check_world(spec, stages, world, device)
    if "train" in stages:
        planned = check_fits(spec, registry, world_size=world[1], device=device)  # the analytic plan; allocates nothing
        if spec.adapter is not None:
            _check_adapter_targets(spec, registry, planned is not None)
    resolved = resolved_dict(spec, registry)
    dist = setup(device, world)
    lock = RunLock(run_dir)
    try:
        dist.once(lambda: _open_run_dir(run_dir, lock))
        ctx = RunContext(
            spec,
            _again(spec_path, output_dir),
            stages,
            resume,
            stop_at,
            registry,
            resolved,
            source,
            trainer,
            dist,
            echo if dist.is_main else _quiet,
        )
        return _pipeline(ctx)
    finally:
        lock.__exit__()


def _check_adapter_targets(spec: RunSpec, registry: Registry, planned: bool) -> None:
    """The adapter's targets exist in this model, before any work. An adapter that tells the plan which layers it
    wraps (AdapterPlugin.plan_layers) has been checked by the plan, counted from one block, or is checked that way
    here when the plan could not be made yet (the vocabulary comes with the tokenizer); another adapter is applied
    to the model built on the meta device (no memory, no weights)."""
    adapter = registry.get("adapter", spec.adapter.type)
    if type(adapter).plan_layers is not AdapterPlugin.plan_layers:
        if not planned:
            count_model(spec, registry, vocab_size=1)
        return
    with torch.device("meta"):
        build_model(spec, registry, 1)


def _again(spec_path: str | Path, output_dir: str | Path | None) -> str:
    """The command that runs this spec into this run directory again, for the hints (with the --output-dir given)."""
    return shlex.join(["aic", "run", str(spec_path), *(["--output-dir", str(output_dir)] if output_dir else [])])


def _quiet(_: str) -> None:
    """What ranks other than 0 print: nothing (rank 0 speaks for the run)."""


def _check_world(spec: RunSpec, stages: list[str], world: tuple[int, int, int, int], device: torch.device) -> None:
    """Before any process group starts: the launch fits the spec and the machine."""
    _, world_size, _, local_world = world
    if world_size == 1:
        return
    if "train" not in stages:
        raise SpecError(
            f"--stage {','.join(stages)}: only training runs on several processes ({world_size} were launched). "
            f"Run these stages as one process: `aic run SPEC --stage {','.join(stages)}`."
        )
    t = spec.train
    if t.grad_accum % world_size:
        fits = [n for n in range(1, t.grad_accum + 1) if t.grad_accum % n == 0]
        raise SpecError(
            f"train.grad_accum: {t.grad_accum} micro-batches per step cannot be shared by {world_size} processes. "
            f"The global batch is train.batch_size x train.grad_accum = {t.batch_size * t.grad_accum} sequences "
            "whatever the number of processes, and each process takes grad_accum / processes micro-batches of "
            f"batch_size. Set train.grad_accum to a multiple of {world_size} (e.g. "
            f"{world_size * max(1, t.grad_accum // world_size)}), or launch {', '.join(map(str, fits))} processes."
        )
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise SpecError(
                f"train.trainer.device: {local_world} processes on this machine, but it has {gpus} CUDA GPU(s); "
                "each process trains on its own GPU. "
                f"Launch at most {gpus} processes per machine (torchrun --nproc_per_node {gpus})."
            )


@dataclass
class RunContext:
    """What one `aic run` opens once and hands from stage to stage, so no stage reopens a file or rebuilds a model
    another has: the spec and its resolved form, the registry, the trainer plugin, the process group, the run's
    latest checkpoint, the `model.init_from` source, the tokenizer and its hash, the model and its parameter counts."""

    spec: RunSpec
    again: str  # the command that runs this spec into this run directory, for hints: `{again} --resume`
    stages: list[str]
    resume: bool
    stop_at: int | None
    registry: Registry
    resolved: dict[str, Any]  # resolved_dict(spec, registry): written to spec.resolved.json and every checkpoint
    source: ModelSource | None  # model.init_from, opened once by load_spec_with_source
    trainer: TrainerPlugin
    dist: Dist
    echo: Callable[[str], None]
    checkpoint: Checkpoint | None = None  # the latest: as the run found it (rank 0), then as training left it
    tokenizer: Tokenizer | None = None
    tokenizer_hash: str | None = None
    loaded: Loaded | None = None  # the model eval and generate use: the one just trained, or loaded once from disk
    parameters: tuple[int, int] | None = None  # (total, trainable) of the run's model, for the report

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir

    @property
    def tokenizer_path(self) -> Path:
        return self.run_dir / TOKENIZER_FILE

    def model(self) -> Loaded:
        """The model of the latest checkpoint: the one in memory, else loaded from disk once."""
        if self.loaded is None:
            self.loaded = load_checkpoint_model(
                self.run_dir, self.registry, resolve_device("auto"), checkpoint=self.checkpoint
            )
            self.checkpoint = self.loaded.checkpoint
            model = self.loaded.model
            self.parameters = (model.num_params(), model.num_params(trainable_only=True))
        return self.loaded


def _pipeline(ctx: RunContext) -> Path:
    ckpt_dir = latest_checkpoint(ctx.run_dir)
    ctx.dist.once(lambda: _prepare(ctx, ckpt_dir))
    ctx.tokenizer_hash = file_sha256(ctx.tokenizer_path)
    ctx.tokenizer = load_tokenizer(ctx.spec, ctx.registry, ctx.tokenizer_path)
    if "train" in ctx.stages and not _train_stage(ctx, ckpt_dir if ctx.resume else None):
        return ctx.run_dir  # stopped early (--stop-at): eval and generate wait for the end of training
    if ctx.dist.is_main:  # the others are done: they do not wait (an eval or generate stage may outlast any timeout)
        if "eval" in ctx.stages:
            _eval_stage(ctx)
        if "generate" in ctx.stages:
            _generate_stage(ctx)
        if "train" in ctx.stages or (ctx.run_dir / "metrics.jsonl").is_file():
            _report(ctx)
    return ctx.run_dir


def _prepare(ctx: RunContext, ckpt_dir: Path | None) -> None:
    """Rank 0: the checks that read the run directory, then the resolved spec and the tokenizer."""
    spec, stages, run_dir, tok_path, echo = ctx.spec, ctx.stages, ctx.run_dir, ctx.tokenizer_path, ctx.echo
    ckpt = ctx.checkpoint = open_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if "train" in stages:
        if ctx.resume and ckpt is None:
            raise CheckpointError(
                f"--resume: {run_dir} holds no checkpoint to resume from. Run without --resume to start training."
            )
        if not ctx.resume and ckpt is not None:
            raise CheckpointError(
                f"{run_dir} already holds a trained checkpoint ({ckpt.path.name}); nothing was changed. "
                f"Pass --resume to continue that run, or give this run a new name or output_dir."
            )
        if ctx.resume:
            _check_resume(ctx.resolved, ckpt, echo, spec)
            _check_stop_at(ctx.stop_at, spec, ckpt)
            if ckpt.step >= spec.train.steps:
                echo(
                    f"resume: {ckpt.path.name} is already at train.steps ({spec.train.steps}); "
                    f"nothing left to train (raise train.steps to train further)"
                )
    elif ckpt is not None and ({"eval", "generate"} & set(stages)):
        _check_same_model(ctx.resolved, ckpt, stages, spec)
    if ckpt is not None and ctx.resume and tok_path.is_file() and ckpt.state["tokenizer_hash"] != file_sha256(tok_path):
        raise CheckpointError(
            f"--resume: {tok_path} is not the tokenizer checkpoint {ckpt.path.name} was trained with. "
            f"Copy {ckpt.tokenizer_path} back to {tok_path}, or start a new run."
        )
    _check_writable(run_dir, stages)
    # The resolved spec describes the run's checkpoints: written when training (re)starts or before there are any.
    if "train" in stages or ckpt is None:
        write_json(run_dir / "spec.resolved.json", ctx.resolved)
    processes = f", {ctx.dist.world_size} processes" if ctx.dist.active else ""
    echo(f"run {spec.name}: {run_dir} (stages: {', '.join(stages)}{processes})")
    if "tokenizer" in stages:
        _tokenizer_stage(ctx)
    if not tok_path.is_file():
        raise DataError(
            f"{tok_path}: no tokenizer in the run directory yet. "
            f"Run the tokenizer stage first: `{ctx.again} --stage tokenizer`."
        )


def _train_stage(ctx: RunContext, resume_from: Path | None) -> bool:
    """Build the model, map the data, train. False when training stopped before train.steps (--stop-at)."""
    spec, registry, dist, echo, tokenizer = ctx.spec, ctx.registry, ctx.dist, ctx.echo, ctx.tokenizer
    torch.manual_seed(spec.seed)  # the same seed gives the same initial weights, on every rank

    def build() -> Transformer:
        return build_model(spec, registry, tokenizer.vocab_size, init_weights=not ctx.resume, source=ctx.source)

    model = ctx.trainer.build_model(spec.train.trainer, spec, dist, build)
    if dist.rank:  # dropout masks differ between ranks
        torch.manual_seed(spec.seed + dist.rank)
    if spec.model.init_from and not ctx.resume:
        echo(f"model: weights from {spec.model.init_from}")
    seq_len = spec.train.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise SpecError(
            f"train.seq_len: {seq_len} is longer than the model's context (block_size {model.config.block_size}). "
            f"Lower train.seq_len or raise model.block_size."
        )
    t0 = time.perf_counter()

    def splits(may_encode: bool = True):
        cache = token_cache_dir(spec.data.cache_dir)
        read = read_options(spec)
        d = spec.data
        return load_splits(
            d.train, d.val, d.val_fraction, tokenizer, ctx.tokenizer_hash, cache, seq_len, read, echo, may_encode
        )

    built = dist.once(splits, local=True)  # each machine encodes the corpus once; the other ranks then map the cache
    train_data, val_data = dist.each(lambda: built or splits(may_encode=False))
    n_train, n_val, took = len(train_data), len(val_data), time.perf_counter() - t0
    echo(f"data: {n_train:,} training and {n_val:,} validation tokens ({took:.1f}s)")
    total, trainable = ctx.parameters = model.num_params(), model.num_params(trainable_only=True)
    adapted = f"; {spec.adapter.type}: {trainable:,} trainable ({100 * trainable / total:.2f}%)" if spec.adapter else ""
    echo(f"model: {spec.model.type} + {spec.model.positional.type}, {total:,} parameters{adapted}")
    adapter = registry.get("adapter", spec.adapter.type) if spec.adapter else None
    job = TrainJob(
        spec,
        ctx.resolved,
        model,
        train_data,
        val_data,
        ctx.run_dir,
        ctx.tokenizer_path,
        ctx.tokenizer_hash,
        resume_from,
        ctx.stop_at,
        adapter,
        dist,
        tokens=tokenizer.roles(),
    )
    t0 = time.perf_counter()
    try:
        ctx.trainer.train(spec.train.trainer, job)
    except KeyboardInterrupt:
        latest = latest_checkpoint(ctx.run_dir)
        saved = f"the latest checkpoint is {latest}" if latest else "no checkpoint was saved"
        raise Interrupted(f"training interrupted; {saved}. Continue with `{ctx.again} --resume`.") from None
    echo(f"train: done in {time.perf_counter() - t0:.1f}s")
    if dist.is_main:
        ctx.checkpoint = open_checkpoint(ctx.run_dir)  # the one training wrote last
    if ctx.stop_at is not None and ctx.stop_at < spec.train.steps:
        echo(f"stopped after step {ctx.stop_at} of {spec.train.steps}; continue with `{ctx.again} --resume`")
        if dist.is_main:
            _report(ctx)
        return False
    # The trained model goes to the eval and generate stages as it is, not reloaded from disk.
    ctx.loaded = Loaded(job.model.eval(), tokenizer, spec, ctx.checkpoint)
    return True


def read_options(spec: RunSpec) -> ReadOptions:
    """How the data section's inputs are read, with what chat data needs from the other sections: the tokenizer's
    chat template and what the loss covers."""
    import dataclasses

    read = ReadOptions.of(spec.data)
    if not read.chat:
        return read
    return dataclasses.replace(
        read, chat_template=spec.tokenizer.chat_template, loss_on=spec.train.loss_on or "assistant"
    )


def _tokenizer_stage(ctx: RunContext) -> None:
    spec, registry, tok_path, echo = ctx.spec, ctx.registry, ctx.tokenizer_path, ctx.echo
    if ctx.checkpoint is not None and tok_path.is_file():
        echo(f"tokenizer: reusing {tok_path} (the run already has checkpoints)")
    elif spec.model.init_from:
        src = ctx.source or open_source(Path(spec.model.init_from), registry)
        write_atomic(tok_path, src.tokenizer_path.read_bytes())
        echo(f"tokenizer: {spec.tokenizer.type} from model.init_from ({src.tokenizer_path})")
    else:
        t0 = time.perf_counter()
        plugin = registry.get("tokenizer", spec.tokenizer.type)
        _remove_tokenizer_litter(tok_path.parent)
        if plugin.trains:
            limit = spec.tokenizer.sample_bytes
            try:
                with (
                    tokenizer_corpus(spec.data.train, read_options(spec), tok_path.parent) as (files, corpus),
                    sample_corpus(files, limit, tok_path.parent) as (files, sampled),
                ):
                    trained = plugin.train(spec.tokenizer, files, tok_path)
            except OSError as exc:
                raise _tokenizer_write_error(exc, spec, tok_path) from None
            sample = getattr(trained, "training_sample", None)  # what the plugin sampled from the corpus, if it says
            parts = [corpus]
            if sampled:  # more than tokenizer.sample_bytes: trained on a sample of that size
                parts.append(f"{sampled} (tokenizer.sample_bytes {limit:,})")
            if sample:
                parts.append(sample)
            echo(
                f"tokenizer: trained {spec.tokenizer.type} in {time.perf_counter() - t0:.1f}s on "
                f"{'; '.join(parts)} -> {tok_path}"
            )
        else:  # nothing to learn from the corpus; the plugin still writes its file
            plugin.train(spec.tokenizer, [], tok_path)
            echo(f"tokenizer: {spec.tokenizer.type} needs no training; wrote {tok_path}")


def _remove_tokenizer_litter(run_dir: Path) -> None:
    """What a killed tokenizer stage left in the run directory: a plugin's `.tokenizer.model.*.tmp` folders, and
    the `.tokenizer-text-*` folders of tokenizer_corpus's text and sample_corpus's sample. This process holds the
    run's lock, so no live run is writing them."""
    for path in [*run_dir.glob(f".{TOKENIZER_FILE}.*.tmp"), *run_dir.glob(".tokenizer-text-*")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _tokenizer_write_error(exc: OSError, spec: RunSpec, tok_path: Path) -> AicError:
    """An OSError while training the tokenizer (a full disk, most often) as the error to show."""
    if is_disk_full(exc):
        kept = f"Its temporary files were removed; {tok_path.name} was left as it was."
        return disk_full_error(tok_path.parent, f"the tokenizer ({spec.tokenizer.type})", kept)
    where = f" ({exc.filename})" if exc.filename else ""
    return DataError(
        f"tokenizer: training {spec.tokenizer.type} failed: {exc.strerror or exc}{where}. "
        f"Check that the data.train files are readable and that {tok_path.parent} can be written."
    )


def _report(ctx: RunContext) -> None:
    """summary.json and report.png; the run's work is done, so a report that cannot be made is a warning."""
    run_dir = ctx.run_dir
    try:
        write_report(run_dir, ctx.echo, ctx.checkpoint, ctx.parameters)
    except AicError as exc:
        warnings.warn(f"report: not written ({exc}). Try `aic report {run_dir}` after fixing it.", stacklevel=2)


def _eval_stage(ctx: RunContext) -> None:
    """Evaluate the latest checkpoint with the spec's eval and data sections: the model just trained, or (a stage
    run alone) the checkpoint's, loaded from disk."""
    spec, run_dir, echo = ctx.spec, ctx.run_dir, ctx.echo
    loaded = ctx.model()
    device = loaded.model.wte.weight.device
    trained = loaded.checkpoint.state["spec"]
    metrics = loaded.checkpoint.state.get("metrics") or {}
    same = all(trained.get(k) == ctx.resolved.get(k) for k in ("eval", "data", "seed"))
    # The trainer evaluated its last step as this spec would (same eval, data and seed); else evaluate here.
    seq_len = spec.train.seq_len or loaded.model.config.block_size
    val = None
    if "val_loss" not in metrics or not same or spec.eval.exact_match:
        tok_hash = loaded.checkpoint.state["tokenizer_hash"]
        _, val = load_splits(
            spec.data.train,
            spec.data.val,
            spec.data.val_fraction,
            loaded.tokenizer,
            tok_hash,
            token_cache_dir(spec.data.cache_dir),
            seq_len,
            read_options(spec),
        )
    if "val_loss" not in metrics or not same:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        metrics = evaluate(loaded.model, val, spec, seq_len, device, autocast)
        log = MetricsLog.for_run(run_dir, spec.train)
        log.write(stage="eval", step=loaded.checkpoint.step, **metrics)
        log.close()
    result = {"checkpoint": str(loaded.checkpoint.path), "step": loaded.checkpoint.step, **metrics}
    if spec.eval.exact_match:
        from aic_core.data.chat import chat_template

        template = chat_template(spec.tokenizer.chat_template, loaded.tokenizer)
        score, answers = exact_match(loaded.model, loaded.tokenizer, val, spec.eval.exact_match, template.end_of_turn())
        result.update(exact_match=score, exact_match_n=len(answers))
        write_atomic(run_dir / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers))
        echo(
            f"eval: exact match {score:.1%} of {len(answers)} held-out conversations' last replies (greedy) "
            f"-> {run_dir / 'answers.jsonl'}"
        )
    write_json(run_dir / "eval.json", result)
    echo(
        f"eval: step {result['step']}: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}  "
        f"val_bpb {metrics['val_bpb']:.4f}"
    )


def exact_match(model: Any, tokenizer: Any, val: Any, n: int, end_id: int, batch: int = 32) -> tuple[float, list]:
    """Greedy replies to the first `n` whole validation conversations (`ChatData.last_turns`), each compared with
    the conversation's last assistant turn as text (stripped): the fraction equal, and each (prompt, expected, got)."""
    from aic_core.generate import generate
    from aic_core.spec import SamplerSpec

    pairs = val.last_turns(n)
    if not pairs:
        return 0.0, []
    greedy = SamplerSpec(temperature=0)
    model.eval()
    answers = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        room = model.config.block_size - max(len(p) for p, _ in chunk)
        longest = max(len(a) for _, a in chunk) + 8
        max_new = max(1, min(longest, room)) if model.positional.max_positions is not None else longest
        replies = generate(model, tokenizer, [p for p, _ in chunk], max_new, greedy, stop_ids=[end_id])
        for (prompt, answer), reply in zip(chunk, replies):
            expected = tokenizer.decode([t for t in answer if t != end_id]).strip()
            answers.append(
                {
                    "prompt": tokenizer.decode(prompt),
                    "expected": expected,
                    "got": reply.strip(),
                    "match": reply.strip() == expected,
                }
            )
    return sum(a["match"] for a in answers) / len(answers), answers


def _generate_stage(ctx: RunContext) -> None:
    """Samples from the latest checkpoint for the spec's generate section (the model just trained, or from disk): its
    prompts, and its conversations (generate.messages) through the chat template."""
    spec, run_dir, echo = ctx.spec, ctx.run_dir, ctx.echo
    loaded = ctx.model()
    g = spec.generate
    if not g.prompts and not g.messages:
        echo("generate: no prompts or messages in the spec's generate section; skipped")
        return
    seed = spec.seed if g.seed is None else g.seed
    options = dict(stop=g.stop, seed=seed, use_cache=g.use_cache, decode_step=g.decode_step)
    step = loaded.checkpoint.step
    parts = []
    if g.prompts:
        texts = generate(loaded.model, loaded.tokenizer, g.prompts, g.max_new_tokens, g.sampler, **options)
        parts += [f"=== sample {i + 1} (step {step}) ===\n{p}{t}\n" for i, (p, t) in enumerate(zip(g.prompts, texts))]
    if g.messages:
        from aic_core.data.chat import chat_template

        template = chat_template(spec.tokenizer.chat_template, loaded.tokenizer, "generate.messages")
        conversations = [[m.model_dump() for m in c] for c in g.messages]
        ids = [template.encode(c, add_generation_prompt=True) for c in conversations]
        stop_ids = [template.end_of_turn()]
        replies = generate(
            loaded.model, loaded.tokenizer, ids, g.max_new_tokens, g.sampler, stop_ids=stop_ids, **options
        )
        for i, (c, reply) in enumerate(zip(conversations, replies)):
            turns = "".join(f"{m['role']}: {m['content']}\n" for m in c)
            parts.append(f"=== conversation {i + 1} (step {step}) ===\n{turns}assistant: {reply}\n")
    write_atomic(run_dir / "samples.txt", "\n".join(parts))
    for part in parts:
        echo(part)
    echo(f"generate: {len(parts)} samples -> {run_dir / 'samples.txt'}")
