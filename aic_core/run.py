"""The pipeline behind `aic run`: tokenizer -> train -> eval -> generate, into one run directory.

    run_dir/spec.resolved.json   the spec with defaults filled in, and versions
    run_dir/tokenizer.model      the trained tokenizer
    run_dir/checkpoints/step-N/  weights, trainer state, state.json, tokenizer copy
    run_dir/metrics.jsonl        training loss, validation metrics
    run_dir/eval.json            the eval stage's result
    run_dir/samples.txt          the generate stage's samples
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aic_core.checkpoint import Checkpoint, latest_checkpoint, load_weights, open_checkpoint, write_atomic, write_json
from aic_core.data import file_sha256, load_splits, token_cache_dir
from aic_core.errors import CheckpointError, DataError, SpecError, did_you_mean
from aic_core.kinds import Tokenizer, TrainJob
from aic_core.nn.transformer import Transformer
from aic_core.registry import Registry, get_registry
from aic_core.spec import ModelSpec, load_spec, resolved_dict, spec_from_resolved
from aic_core.training import MetricsLog, evaluate, resolve_device

STAGES = ("tokenizer", "train", "eval", "generate")
TOKENIZER_FILE = "tokenizer.model"


def build_model(spec: ModelSpec, registry: Registry, vocab_size: int, init_weights: bool = False) -> Transformer:
    """Model plugin + positional plugin (+ adapter) -> Transformer, weights freshly initialised or, with
    `init_weights` and a `model.init_from`, the source's (loaded before an adapter wraps the model)."""
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
        from aic_core.convert import open_source

        src = open_source(Path(spec.model.init_from), registry)
        load_weights(
            model, src.weights(config), str(src.path),
            "the spec's model (model.init_from: keys set in the spec's model section override the source's, and shapes must match its weights)",
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
    checkpoint: Checkpoint


def load_checkpoint_model(path: Path, registry: Registry | None = None, device: torch.device | str = "cpu") -> Loaded:
    """A run directory (its latest checkpoint) or a checkpoint folder -> model, tokenizer and spec."""
    registry = registry or get_registry()
    ckpt = open_checkpoint(Path(path))
    spec = spec_from_resolved(ckpt.state["spec"], registry, source=str(ckpt.path / "state.json"))
    if not ckpt.has_tokenizer or spec.tokenizer is None:
        raise CheckpointError(
            f"{ckpt.path}: holds no tokenizer (it was imported from a folder without one), so it cannot turn text into tokens. "
            f"Put the model's tokenizer file (for sentencepiece: tokenizer.model) in the Hugging Face folder and import it again."
        )
    actual = file_sha256(ckpt.tokenizer_path)
    if actual != ckpt.state["tokenizer_hash"]:
        raise CheckpointError(
            f"{ckpt.tokenizer_path}: this tokenizer (sha256 {actual[:12]}) is not the one the model was trained with "
            f"(sha256 {ckpt.state['tokenizer_hash'][:12]}); token ids would mean different things. Restore the checkpoint's own tokenizer.model."
        )
    tokenizer = load_tokenizer(spec, registry, ckpt.tokenizer_path)
    model = build_model(spec, registry, tokenizer.vocab_size)
    load_weights(model, ckpt.weights(), str(ckpt.path), "the model in its spec")
    return Loaded(model.to(device).eval(), tokenizer, spec, ckpt)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [f"{path}: {b!r} -> {a!r}"]


def _check_resume(spec_dict: dict[str, Any], ckpt: Checkpoint) -> None:
    old = ckpt.state["spec"]
    for section in ("model", "tokenizer", "adapter"):
        changes = _diff(spec_dict.get(section), old.get(section), section)
        if changes:
            raise CheckpointError(
                f"--resume: the spec's {section} section differs from checkpoint {ckpt.path} ({'; '.join(changes[:6])}). "
                f"A run resumes with the model it was trained with: undo the change, or start a new run (a new name or output_dir)."
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
) -> Path:
    """Run the stages of a spec; return the run directory."""
    registry = registry or get_registry()
    spec = load_spec(spec_path, registry)
    stages = _stages(stages)
    run_dir = spec.run_dir
    ckpt_dir = latest_checkpoint(run_dir)
    resolved = resolved_dict(spec, registry)
    ckpt = None
    if "train" in stages:
        if resume and ckpt_dir is None:
            raise CheckpointError(f"--resume: {run_dir} holds no checkpoint to resume from. Run without --resume to start training.")
        if not resume and ckpt_dir is not None:
            raise CheckpointError(
                f"{run_dir} already holds a trained checkpoint ({ckpt_dir.name}); nothing was changed. "
                f"Pass --resume to continue that run, or give this run a new name or output_dir."
            )
        if resume:
            ckpt = open_checkpoint(ckpt_dir)
            _check_resume(resolved, ckpt)
    for field, files in (("data.train", spec.data.train), ("data.val", spec.data.val)):
        for name in files:
            if not Path(name).is_file():
                raise DataError(f"{field}: file not found: {name}. Check the path (relative paths are taken from the spec file's folder).")
    if spec.adapter is not None and "train" in stages:
        with torch.device("meta"):  # no memory, no weights: only that the adapter's targets exist in this model
            build_model(spec, registry, 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "spec.resolved.json", resolved)
    echo(f"run {spec.name}: {run_dir} (stages: {', '.join(stages)})")

    tok_path = run_dir / TOKENIZER_FILE
    if "tokenizer" in stages:
        if ckpt_dir is not None and tok_path.is_file():
            echo(f"tokenizer: reusing {tok_path} (the run already has checkpoints)")
        elif spec.model.init_from:
            from aic_core.convert import open_source

            src = open_source(Path(spec.model.init_from), registry)
            write_atomic(tok_path, src.tokenizer_path.read_bytes())
            echo(f"tokenizer: {spec.tokenizer.type} from model.init_from ({src.tokenizer_path})")
        else:
            t0 = time.perf_counter()
            plugin = registry.get("tokenizer", spec.tokenizer.type)
            if plugin.trains:
                plugin.train(spec.tokenizer, [Path(p) for p in spec.data.train], tok_path)
                echo(f"tokenizer: trained {spec.tokenizer.type} in {time.perf_counter() - t0:.1f}s -> {tok_path}")
            else:  # nothing to learn from the corpus; the plugin still writes its file
                plugin.train(spec.tokenizer, [], tok_path)
                echo(f"tokenizer: {spec.tokenizer.type} needs no training; wrote {tok_path}")
    if not tok_path.is_file():
        raise DataError(f"{tok_path}: no tokenizer in the run directory yet. Run the tokenizer stage first: `aic run {spec_path} --stage tokenizer`.")
    tokenizer_hash = file_sha256(tok_path)
    if ckpt is not None and ckpt.state["tokenizer_hash"] != tokenizer_hash:
        raise CheckpointError(
            f"--resume: {tok_path} is not the tokenizer checkpoint {ckpt.path.name} was trained with. "
            f"Copy {ckpt.tokenizer_path} back to {tok_path}, or start a new run."
        )
    tokenizer = load_tokenizer(spec, registry, tok_path)

    if "train" in stages:
        torch.manual_seed(spec.seed)  # the same seed gives the same initial weights
        model = build_model(spec, registry, tokenizer.vocab_size, init_weights=not resume)
        if spec.model.init_from and not resume:
            echo(f"model: weights from {spec.model.init_from}")
        seq_len = spec.train.seq_len or model.config.block_size
        if seq_len > model.config.block_size:
            raise SpecError(f"train.seq_len: {seq_len} is longer than the model's context (block_size {model.config.block_size}). Lower train.seq_len or raise model.block_size.")
        t0 = time.perf_counter()
        train_data, val_data = load_splits(
            spec.data.train, spec.data.val, spec.data.val_fraction, tokenizer, tokenizer_hash, token_cache_dir(spec.data.cache_dir), seq_len
        )
        echo(f"data: {len(train_data):,} training and {len(val_data):,} validation tokens ({time.perf_counter() - t0:.1f}s)")
        total, trainable = model.num_params(), model.num_params(trainable_only=True)
        adapted = f"; {spec.adapter.type}: {trainable:,} trainable ({100 * trainable / total:.2f}%)" if spec.adapter else ""
        echo(f"model: {spec.model.type} + {spec.model.positional.type}, {total:,} parameters{adapted}")
        trainer = registry.get("trainer", spec.train.trainer.type)
        adapter = registry.get("adapter", spec.adapter.type) if spec.adapter else None
        job = TrainJob(spec, resolved, model, train_data, val_data, run_dir, tok_path, tokenizer_hash, ckpt_dir if resume else None, stop_at, adapter)
        t0 = time.perf_counter()
        trainer.train(spec.train.trainer, job)
        echo(f"train: done in {time.perf_counter() - t0:.1f}s")
        if stop_at is not None and stop_at < spec.train.steps:
            echo(f"stopped after step {stop_at} of {spec.train.steps}; continue with `aic run {spec_path} --resume`")
            return run_dir

    if "eval" in stages:
        _eval_stage(run_dir, registry, echo)
    if "generate" in stages:
        _generate_stage(run_dir, registry, echo)
    return run_dir


def _eval_stage(run_dir: Path, registry: Registry, echo: Callable[[str], None]) -> None:
    device = resolve_device("auto")
    loaded = load_checkpoint_model(run_dir, registry, device)
    spec, metrics = loaded.spec, loaded.checkpoint.state.get("metrics") or {}
    if "val_loss" not in metrics:  # the trainer evaluates its last step; anything else is evaluated here
        seq_len = spec.train.seq_len or loaded.model.config.block_size
        tok_hash = loaded.checkpoint.state["tokenizer_hash"]
        _, val = load_splits(
            spec.data.train, spec.data.val, spec.data.val_fraction, loaded.tokenizer, tok_hash, token_cache_dir(spec.data.cache_dir), seq_len
        )
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        metrics = evaluate(loaded.model, val, spec, seq_len, device, autocast)
        log = MetricsLog(run_dir / "metrics.jsonl")
        log.write(stage="eval", step=loaded.checkpoint.step, **metrics)
        log.close()
    result = {"checkpoint": str(loaded.checkpoint.path), "step": loaded.checkpoint.step, **metrics}
    write_json(run_dir / "eval.json", result)
    echo(f"eval: step {result['step']}: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}  val_bpb {metrics['val_bpb']:.4f}")


def _generate_stage(run_dir: Path, registry: Registry, echo: Callable[[str], None]) -> None:
    from aic_core.generation import generate

    loaded = load_checkpoint_model(run_dir, registry, resolve_device("auto"))
    g = loaded.spec.generate
    if not g.prompts:
        echo("generate: no prompts in the spec's generate section; skipped")
        return
    seed = loaded.spec.seed if g.seed is None else g.seed
    texts = generate(loaded.model, loaded.tokenizer, g.prompts, g.max_new_tokens, g.sampler, stop=g.stop, seed=seed, use_cache=g.use_cache)
    parts = [f"=== sample {i + 1} (step {loaded.checkpoint.step}) ===\n{p}{t}\n" for i, (p, t) in enumerate(zip(g.prompts, texts))]
    write_atomic(run_dir / "samples.txt", "\n".join(parts))
    for part in parts:
        echo(part)
    echo(f"generate: {len(texts)} samples -> {run_dir / 'samples.txt'}")
