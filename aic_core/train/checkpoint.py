"""Checkpoints: safetensors weights, trainer state (safetensors + JSON), JSON metadata; written atomically.

    run_dir/checkpoints/step-N/{model.safetensors, trainer_state.safetensors, trainer_state.json, state.json,
                               tokenizer.model}
    run_dir/checkpoints/latest      -> "step-N"

A checkpoint is written under a temporary name in the same folder (`.step-N.PID.tmp`), every file fsynced,
then renamed into place; `latest` is replaced atomically after that. A crash never leaves a half-written
checkpoint as the latest; a failed write (a full disk) removes its partial folder and changes nothing else.

Nothing in a checkpoint is a pickle: the trainer state's tensors are in a safetensors file and the rest in
JSON, so reading a checkpoint from anywhere cannot run code. `state.json` records the SHA-256 of every file
written with it (`"files"`); loading the weights, the adapter or the trainer state checks it, so a file
damaged after it was written is refused instead of silently giving garbage.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aic_core.errors import CheckpointError
from aic_core.files import file_sha256, format_bytes

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.safetensors"  # the trainer state's tensors (optimizer moments, RNG states)
TRAINER_STATE_META = "trainer_state.json"  # everything else in it, with references to those tensors
STATE = "state.json"
TOKENIZER = "tokenizer.model"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FILES = "files"  # state.json: {file name: sha256} of the files written with it

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    f"os error {errno.ENOSPC})",
    f"os error {errno.EDQUOT})",
)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """Whether a failed write failed for want of space: OSError ENOSPC/EDQUOT, or a library's error that wraps
    one (safetensors raises SafetensorError "... No space left on device (os error 28)")."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL:
            return True
        if any(text in str(cur) for text in _DISK_FULL_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def disk_full_error(folder: Path, what: str, kept: str, then: str = "run the same command again") -> CheckpointError:
    """The one message for a write that ran out of space: where, how much is free, what was kept, what to do."""
    folder = Path(folder)
    try:
        free = f"{format_bytes(shutil.disk_usage(folder if folder.exists() else folder.parent).free)} free"
    except OSError:
        free = "free space unknown"
    if "--resume" in then:  # the run goes on from its checkpoints, here: a new output_dir would hold none
        room = (
            ": delete what this run no longer needs, such as older checkpoints/step-N folders (train.keep_last "
            "cannot make this room: it deletes old checkpoints only after the next one is written), or move the "
            "whole run directory to a larger disk and pass --output-dir with its new place;"
        )
    else:
        room = " (or point output_dir at a larger disk, or set train.keep_last to keep fewer checkpoints),"
    return CheckpointError(
        f"{folder}: the disk is full (no space left on the device, or the disk quota is used up) while writing {what}; "
        f"{free} on that file system. {kept} Free some space there{room} then {then}."
    )


def write_atomic(
    path: Path, data: bytes | str, kept: str | None = None, then: str = "run the same command again"
) -> None:
    """Write a file under a temporary name in its folder, fsync, then rename over `path`. On failure the
    temporary file is removed and `path` is left as it was; a full disk or a folder this user cannot write is a
    CheckpointError (`kept`: what was left as it was, `then`: what to do after freeing space)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception) and is_disk_full(exc):
            kept = kept or f"The partial file was removed; {path.name} was left as it was."
            raise disk_full_error(path.parent, path.name, kept, then) from None
        if isinstance(exc, OSError):  # e.g. a read-only folder (PermissionError)
            raise CheckpointError(
                f"{path}: cannot be written ({exc.strerror or exc}). {kept or f'{path.name} was left as it was.'} "
                f"Make {path.parent} writable by this user "
                f"(or run as the user who owns it), then {then}."
            ) from None
        raise


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


def verify_file(path: Path, files: dict[str, str] | None) -> None:
    """Check `path` against the SHA-256 recorded for it in state.json's "files" (checkpoints written before
    hashes were recorded have none: nothing to check)."""
    path = Path(path)
    expected = (files or {}).get(path.name)
    if not expected:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: damaged after it was written (corrupt): its SHA-256 is {actual[:12]}..., but {STATE} recorded "
            f"{expected[:12]}... when the checkpoint was saved, so its bytes are no longer the ones training wrote "
            "(a disk, copy or transfer error, or an edit). Do not use it: use an earlier checkpoint of this run "
            "(checkpoints/step-N), or retrain."
        )


def recorded_files(folder: Path) -> dict[str, str]:
    """state.json's {file: sha256} of a checkpoint folder; {} if it records none (or has no readable state.json)."""
    try:
        files = json.loads((Path(folder) / STATE).read_text()).get(FILES)
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def verified(folder: Path, name: str) -> Path:
    """`folder/name`, after checking it against the hash its folder's state.json recorded (for readers outside
    this module, e.g. the adapter loader)."""
    path = Path(folder) / name
    verify_file(path, recorded_files(folder))
    return path


# --- trainer state: tensors in safetensors, the rest in JSON; never a pickle ------------------------------

_TENSOR, _NDARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """A nested trainer state -> JSON, each tensor replaced by a reference to its entry in `tensors`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = seen.get(id(obj))
        if key is None:
            key = "/".join(path) or "tensor"
            while key in tensors:
                key += "_"
            tensors[key] = obj.detach().to("cpu").contiguous()
            seen[id(obj)] = key
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):  # numpy's RNG state: a uint32 array, kept as a list
        if obj.dtype.kind not in "biuf":
            raise CheckpointError(
                f"trainer state: the numpy array at '{'/'.join(path)}' has dtype {obj.dtype}; only numbers can be "
                "saved."
            )
        return {_NDARRAY: obj.dtype.str, "shape": list(obj.shape), "data": obj.reshape(-1).tolist()}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), path, tensors, seen)
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, [*path, str(i)], tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, [*path, str(i)], tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, [*path, k], tensors, seen) for k, v in obj.items()}
        # Keys JSON cannot keep (the optimizer's state is keyed by parameter index): a list of pairs.
        return {
            _ITEMS: [
                [_encode(k, path, tensors, seen), _encode(v, [*path, str(k)], tensors, seen)] for k, v in obj.items()
            ]
        }
    raise CheckpointError(
        f"trainer state: cannot save a {type(obj).__module__}.{type(obj).__qualname__} at '{'/'.join(path)}'; "
        f"a trainer state holds tensors, numbers, strings, lists, tuples, dicts and numpy number arrays only."
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        if obj[_TENSOR] not in tensors:
            raise CheckpointError(
                f"{source}: names a tensor '{obj[_TENSOR]}' that {TRAINER_STATE} does not hold; the trainer state is "
                "damaged. Resume from an earlier checkpoint."
            )
        return tensors[obj[_TENSOR]]
    if _NDARRAY in obj:
        dtype = np.dtype(obj[_NDARRAY])
        if dtype.kind not in "biuf":
            raise CheckpointError(
                f"{source}: a numpy array of dtype {dtype}; only numbers are read. The trainer state is damaged."
            )
        return np.array(obj["data"], dtype=dtype).reshape(obj["shape"])
    if _TUPLE in obj:
        return tuple(_decode(v, tensors, source) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_decode(k, tensors, source): _decode(v, tensors, source) for k, v in obj[_ITEMS]}
    return {k: _decode(v, tensors, source) for k, v in obj.items()}


def save_trainer_state(folder: Path, trainer_state: dict[str, Any]) -> None:
    """Write a trainer's state (e.g. {"optimizer": optimizer.state_dict(), "scheduler": ..., "rng": rng_state()})
    as trainer_state.safetensors (every tensor) + trainer_state.json (the rest: hyperparameters, scheduler
    state, Python's and numpy's RNG states as lists). Nothing is pickled; floats round-trip exactly."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": "aic-trainer-state/1", "state": _encode(trainer_state, [], tensors, {})}
    save_file(tensors, str(Path(folder) / TRAINER_STATE), metadata={"format": "pt"})
    (Path(folder) / TRAINER_STATE_META).write_text(json.dumps(meta) + "\n")


def load_trainer_state(folder: Path, files: dict[str, str] | None = None) -> dict[str, Any]:
    """The nested dict `save_trainer_state` was given, its tensors on the CPU. Both files are checked against
    `files` (state.json's hashes; read from the folder's state.json when not given)."""
    folder = Path(folder)
    files = recorded_files(folder) if files is None else files
    tensors_path, meta_path = folder / TRAINER_STATE, folder / TRAINER_STATE_META
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing, so training cannot resume from this checkpoint exactly. Resume from an earlier "
                "checkpoint or start a new run."
            )
        verify_file(path, files)
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensors_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: corrupt trainer state ({exc}). Resume from an earlier checkpoint.") from None
    if not isinstance(meta, dict) or meta.get("format") != "aic-trainer-state/1" or "state" not in meta:
        raise CheckpointError(
            f"{meta_path}: not an aic trainer state (no format 'aic-trainer-state/1'). Resume from an earlier "
            "checkpoint."
        )
    try:
        return _decode(meta["state"], tensors, meta_path)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(
            f"{meta_path}: corrupt trainer state ({type(exc).__name__}: {exc}). Resume from an earlier checkpoint."
        ) from None


# --- writing checkpoints --------------------------------------------------------------------------------


def _write_files(folder: Path, weights, trainer_state, state, tokenizer_path, extra) -> None:
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
    if trainer_state is not None:
        save_trainer_state(folder, trainer_state)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / TOKENIZER)
    for f in folder.iterdir():
        _fsync(f)
    # Hash what is on disk now, so state.json vouches for these exact bytes.
    files = {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != STATE}
    (folder / STATE).write_text(json.dumps({**state, FILES: files}, indent=2) + "\n")
    _fsync(folder / STATE)


def write_checkpoint_dir(
    folder: Path,
    weights: dict[str, torch.Tensor],
    trainer_state: dict[str, Any] | None,
    state: dict[str, Any],
    tokenizer_path: Path | None,
    extra: dict[str, bytes] | None = None,
    kept: str = "The partial folder was removed; nothing else was changed.",
    then: str = "run the same command again",
) -> None:
    """Write a checkpoint's files (and `extra` ones) into the new folder `folder`, each fsynced, with state.json
    (`state` plus the SHA-256 of every other file) last. The caller renames it into place. If writing fails
    the folder is removed; a full disk raises CheckpointError saying so (`kept`: what was left as it was)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    try:
        _write_files(folder, weights, trainer_state, state, tokenizer_path, extra)
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            m = _STALE.match(folder.name)
            raise disk_full_error(folder.parent, f"checkpoint {m.group(1)}" if m else folder.name, kept, then) from None
        raise


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
    previous = latest_checkpoint(run_dir)
    kept = (
        f"The partial checkpoint was removed; the earlier checkpoints and `latest` ({previous.name}) are untouched."
        if previous is not None
        else "The partial checkpoint was removed; the run has no earlier checkpoint."
    )
    then = (
        "continue the run: `aic run` with the same spec and --resume"
        if previous is not None
        else "run the same command again"
    )
    write_checkpoint_dir(
        tmp, weights, trainer_state, {**state, "step": step}, tokenizer_path, extra, kept=kept, then=then
    )
    if final.exists():  # the same step saved again (e.g. the last step is also a checkpoint_every step)
        old = root / f".step-{step}.{os.getpid()}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    kept = f"Checkpoint {final.name} is complete, " + (
        f"but `latest` still names {previous.name}, which --resume continues from."
        if previous is not None
        else "and --resume continues from it."
    )
    write_atomic(root / LATEST, final.name + "\n", kept, "continue the run: `aic run` with the same spec and --resume")
    return final


_STALE = re.compile(r"^\.(step-\d+)\.(\d+)\.(tmp|old|del)$")
_STALE_LATEST = re.compile(r"^\.latest\.(\d+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: left by an earlier write of this process, none is in flight now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove what killed runs left in checkpoints/: `.step-N.PID.tmp` (a checkpoint being written),
    `.step-N.PID.old` (the one it replaced), `.step-N.PID.del` (one being deleted by keep_last) and
    `.latest.PID.tmp`, for PIDs that are no longer running (or this process). A `.old` whose step-N is
    missing (killed between the two renames) is the complete checkpoint of step N: it is renamed back.
    Returns what was removed or restored. Called once per training start, before the first checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = []
    for entry in sorted(root.iterdir()):
        m, m_latest = _STALE.match(entry.name), _STALE_LATEST.match(entry.name)
        pid = int(m.group(2)) if m else int(m_latest.group(1)) if m_latest else None
        if pid is None or _pid_alive(pid):
            continue
        if m and m.group(3) == "old" and not (root / m.group(1)).exists() and (entry / STATE).is_file():
            os.replace(entry, root / m.group(1))
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        done.append(entry)
    return done


def prune_checkpoints(run_dir: Path, keep_last: int, keep: Iterable[Path] = ()) -> list[Path]:
    """train.keep_last: delete the oldest complete checkpoints beyond the newest `keep_last`, never the one
    `latest` names nor those in `keep` (the checkpoint a --resume started from). Each is renamed to
    `.step-N.PID.del` first, so a crash mid-delete never leaves a half-deleted folder that looks complete.
    Returns the deleted folders."""
    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    root = Path(run_dir) / CHECKPOINTS
    found = list_checkpoints(run_dir)
    protected = {p.resolve() for p in keep if p is not None}
    pointer = root / LATEST
    if pointer.is_file():
        protected.add((root / pointer.read_text().strip()).resolve())
    deleted = []
    for ckpt in found[: max(len(found) - keep_last, 0)]:
        if ckpt.resolve() in protected:
            continue
        doomed = root / f".{ckpt.name}.{os.getpid()}.del"
        os.replace(ckpt, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(ckpt)
    if deleted:
        _fsync(root)
    return deleted


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of named tensors (names, dtypes, shapes and bytes, in name order): which base an adapter belongs to,
    whatever file format the base came in."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_files(
    tensors: dict[str, torch.Tensor], options: dict[str, Any], base_sha256: str, base_path: str | None
) -> dict[str, bytes]:
    """adapter.safetensors (the adapter's tensors only) and adapter.json (its options and the base it was trained
    on)."""
    from safetensors.torch import save

    meta = {
        "format": "aic-adapter/1",
        "adapter": options,
        "base_sha256": base_sha256,
        "base": base_path,
        "tensors": len(tensors),
    }
    return {
        ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}),
        ADAPTER_META: (json.dumps(meta, indent=2) + "\n").encode(),
    }


class CheckpointWriter:
    """A run's checkpoints, as every trainer writes them (`TrainJob.save_checkpoint`): checkpoints/step-N with
    the weights, the trainer state, the tokenizer and state.json (the resolved spec, the tokenizer's hash, the
    model's config, the validation metrics of that step), and with an adapter its own files (adapter_files).
    The first write removes what killed runs left behind (clean_stale); with `keep_last`, the checkpoints beyond
    the newest keep_last are deleted after each write (prune_checkpoints: never `latest`, nor those in `keep`)."""

    def __init__(
        self,
        run_dir: Path,
        resolved_spec: dict[str, Any],
        tokenizer_path: Path,
        tokenizer_hash: str,
        model: torch.nn.Module,
        adapter: Any = None,
        keep_last: int | None = None,
        keep: Iterable[Path] = (),
        tokens: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir, self.resolved_spec, self.model, self.adapter = run_dir, resolved_spec, model, adapter
        self.tokens = tokens  # the tokenizer's roles: ids of bos, eos, pad and the special tokens
        self.tokenizer_path, self.tokenizer_hash = tokenizer_path, tokenizer_hash
        self.keep_last, self.keep = keep_last, list(keep)
        self._base_sha256: str | None = None
        self._cleaned = False

    def write(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        trainer_state: dict[str, Any] | None,
        metrics: dict[str, float] | None = None,
    ) -> Path:
        if not self._cleaned:
            clean_stale(self.run_dir)
            self._cleaned = True
        state = {
            "spec": self.resolved_spec,
            "tokenizer_hash": self.tokenizer_hash,
            **({"tokens": self.tokens} if self.tokens is not None else {}),
            "model_config": self.model.config.to_dict(),
            "metrics": metrics or {},
        }
        extra = None
        if self.adapter is not None:
            # The names from the model, the values from `weights`: a trainer that shards the model passes the
            # whole weights, while its modules hold only shards.
            tensors = {k: weights[k] for k in self.adapter.adapter_state(self.model)}
            if self._base_sha256 is None:  # the base is frozen: hash it once
                self._base_sha256 = tensors_sha256({k: v for k, v in weights.items() if k not in tensors})
            extra = adapter_files(
                tensors, self.resolved_spec["adapter"], self._base_sha256, self.resolved_spec["model"].get("init_from")
            )
        path = save_checkpoint(self.run_dir, step, weights, trainer_state, state, self.tokenizer_path, extra)
        if self.keep_last is not None:
            prune_checkpoints(self.run_dir, self.keep_last, keep=self.keep)
        return path


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
    named = None
    if pointer.is_file():
        named = pointer.read_text().strip()
        if (root / named / STATE).is_file():
            return root / named
    found = list_checkpoints(run_dir)
    if named is not None:
        instead = f"using {found[-1].name}, the newest complete checkpoint" if found else "there is no other checkpoint"
        warnings.warn(
            f"{pointer} names {named}, which is missing or incomplete (no {STATE}); {instead}. "
            f"Write the step to use into {pointer}, or delete it to use the newest.",
            stacklevel=2,
        )
    return found[-1] if found else None


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run folder; a clear error otherwise."""
    path = Path(path)
    if (path / STATE).is_file() and (path / WEIGHTS).exists():
        return path
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such run or checkpoint folder. Pass a run directory (e.g. runs/austen-tiny) or one of its "
            "checkpoints/step-N folders."
        )
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(
            f"{path}: holds no checkpoint ({CHECKPOINTS}/step-N with {STATE}). Train first: `aic run SPEC`."
        )
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

    @property
    def files(self) -> dict[str, str]:
        """{file name: sha256} recorded when the checkpoint was written ({} for older checkpoints)."""
        files = self.state.get(FILES)
        return files if isinstance(files, dict) else {}

    def weights(self) -> dict[str, torch.Tensor]:
        path = self.path / WEIGHTS
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing. The checkpoint is incomplete; use an earlier checkpoint or retrain."
            )
        verify_file(path, self.files)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: corrupt weights file ({exc}). Use an earlier checkpoint of this run or retrain."
            ) from None

    def trainer_state(self) -> dict[str, Any]:
        """The trainer state saved with this checkpoint; tensors on the CPU (the optimizer moves its own)."""
        return load_trainer_state(self.path, self.files)


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
        raise CheckpointError(
            f"{path / TOKENIZER}: missing; every aic checkpoint carries its tokenizer. Use an earlier checkpoint."
        )
    return Checkpoint(path, state)
