"""Checkpoints: safetensors weights, trainer state, JSON metadata; written atomically.

    run_dir/checkpoints/step-N/{model.safetensors, optimizer.pt, state.json, tokenizer.model}
    run_dir/checkpoints/latest      -> "step-N"

A checkpoint is written under a temporary name in the same folder, every file fsynced, then renamed
into place; `latest` is replaced atomically after that. A crash never leaves a half-written checkpoint
as the latest.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aic_core.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "optimizer.pt"
STATE = "state.json"
TOKENIZER = "tokenizer.model"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file under a temporary name in its folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: contiguous CPU tensors, names as in the module (stable across versions)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load a full state dict, naming missing, unexpected or misshapen tensors in one clear error."""
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{source}: the tensors do not match {what} (missing: {', '.join(missing[:8]) or 'none'}; "
            f"unexpected: {', '.join(extra[:8]) or 'none'}). It is damaged or was written for another model."
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: tensors have the wrong shapes for {what}: {exc}") from None


def write_checkpoint_dir(
    folder: Path,
    weights: dict[str, torch.Tensor],
    trainer_state: dict[str, Any] | None,
    state: dict[str, Any],
    tokenizer_path: Path | None,
    extra: dict[str, bytes] | None = None,
) -> None:
    """Write a checkpoint's files (and `extra` ones) into the new folder `folder`, each fsynced. The caller
    renames it into place."""
    folder.mkdir(parents=True)
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    if trainer_state is not None:
        torch.save(trainer_state, folder / TRAINER_STATE)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / TOKENIZER)
    (folder / STATE).write_text(json.dumps(state, indent=2) + "\n")
    for f in folder.iterdir():
        _fsync(f)


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    trainer_state: dict[str, Any] | None,
    state: dict[str, Any],
    tokenizer_path: Path,
    extra: dict[str, bytes] | None = None,
) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_checkpoint_dir(tmp, weights, trainer_state, {**state, "step": step}, tokenizer_path, extra)
    if final.exists():  # the same step saved again (e.g. the last step is also a checkpoint_every step)
        old = root / f".step-{step}.{os.getpid()}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    write_atomic(root / LATEST, final.name + "\n")
    return final


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of named tensors (names, dtypes, shapes and bytes, in name order): which base an adapter belongs to,
    whatever file format the base came in."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_files(tensors: dict[str, torch.Tensor], options: dict[str, Any], base_sha256: str, base_path: str | None) -> dict[str, bytes]:
    """adapter.safetensors (the adapter's tensors only) and adapter.json (its options and the base it was trained on)."""
    from safetensors.torch import save

    meta = {"format": "aic-adapter/1", "adapter": options, "base_sha256": base_sha256, "base": base_path, "tensors": len(tensors)}
    return {ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}), ADAPTER_META: (json.dumps(meta, indent=2) + "\n").encode()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit() and (d / STATE).is_file():
            found.append((int(d.name[5:]), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if (d / STATE).is_file():
            return d
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run folder; a clear error otherwise."""
    path = Path(path)
    if (path / STATE).is_file() and (path / WEIGHTS).exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint folder. Pass a run directory (e.g. runs/austen-tiny) or one of its checkpoints/step-N folders.")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: holds no checkpoint ({CHECKPOINTS}/step-N with {STATE}). Train first: `aic run SPEC`.")
    return ckpt


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # state.json: step, spec, tokenizer_hash, versions, metrics

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def has_tokenizer(self) -> bool:
        return self.state["tokenizer_hash"] is not None

    def weights(self) -> dict[str, torch.Tensor]:
        path = self.path / WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"{path}: missing. The checkpoint is incomplete; use an earlier checkpoint or retrain.")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt weights file ({exc}). Use an earlier checkpoint of this run or retrain.") from None

    def trainer_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        path = self.path / TRAINER_STATE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, so training cannot resume from this checkpoint exactly. Resume from an earlier checkpoint or start a new run.")
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: corrupt trainer state ({type(exc).__name__}: {exc}). Resume from an earlier checkpoint.") from None


def open_checkpoint(path: Path) -> Checkpoint:
    path = find_checkpoint(path)
    try:
        state = json.loads((path / STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / STATE}: corrupt ({exc}). Use an earlier checkpoint of this run.") from None
    for key in ("step", "spec", "tokenizer_hash", "model_config"):
        if key not in state:
            raise CheckpointError(f"{path / STATE}: has no '{key}'; this is not an aic checkpoint or it is damaged.")
    # A checkpoint imported from a folder without a tokenizer has tokenizer_hash null and no tokenizer file.
    if state["tokenizer_hash"] is not None and not (path / TOKENIZER).is_file():
        raise CheckpointError(f"{path / TOKENIZER}: missing; every aic checkpoint carries its tokenizer. Use an earlier checkpoint.")
    return Checkpoint(path, state)
