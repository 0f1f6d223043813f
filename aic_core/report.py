"""`aic report RUN`: a run's summary.json and report.png, from what the run directory already holds.

    run_dir/summary.json   wall time, tokens/s, tokens, final train and val loss, bits per byte, parameters, device
    run_dir/report.png     training and validation loss against steps (bottom axis) and tokens (top axis)

This module imports nothing heavy at the top; torch and matplotlib load when needed.
"""

from __future__ import annotations

import io
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aic_core.errors import AicError, CheckpointError
from aic_core.train.checkpoint import Checkpoint, latest_checkpoint, open_checkpoint, write_atomic, write_json

METRICS, SUMMARY, PNG, EVAL, RESOLVED = "metrics.jsonl", "summary.json", "report.png", "eval.json", "spec.resolved.json"
MATPLOTLIB_HINT = 'report.png needs matplotlib: pip install "aic[report]"'

# --- reading the run directory ---------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, in file order. A line that does not parse (a run killed mid-write leaves a
    partial last line) is skipped."""
    path = Path(run_dir) / METRICS
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory. Pass the output_dir of a run, e.g. runs/austen-tiny.")
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    if not any(_is_train(r) for r in records):
        raise CheckpointError(
            f"{path}: {'holds no training loss' if path.is_file() else 'not found'}, so there is nothing to report. "
            "Pass the directory of a run that trained (`aic run SPEC` writes metrics.jsonl there), "
            "e.g. runs/austen-tiny."
        )
    return records


def _is_train(rec: dict[str, Any]) -> bool:
    return "loss" in rec and "step" in rec and rec.get("stage") is None


def segments(records: list[dict[str, Any]], tokens_per_step: int) -> list[tuple[float, int, float, int]]:
    """The training segments (start time, start step, end time, end step): the first run and one per resume,
    so that a pause between a crash and `--resume` counts for nothing. The first segment starts before its
    first line by that line's own interval (its steps at its tokens_per_s); a resumed one at its resume event."""
    out: list[list[Any]] = []
    for rec in records:
        if rec.get("stage") is not None or "time" not in rec or "step" not in rec:
            continue  # the eval stage's lines come after training
        if rec.get("event") == "resume" or not out:
            start, start_step = rec["time"], rec["step"]
            if rec.get("event") != "resume":
                start_step = 0
                if rec.get("tokens_per_s"):
                    start -= tokens_per_step * rec["step"] / rec["tokens_per_s"]
            out.append([start, start_step, rec["time"], rec["step"]])
        else:
            out[-1][2], out[-1][3] = rec["time"], max(out[-1][3], rec["step"])
    return [tuple(s) for s in out]


def _last_by_step(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) for each step, the later record winning (steps trained again after a resume)."""
    by_step = {r["step"]: r[key] for r in records if key in r and "step" in r}
    return sorted(by_step.items())


def _parameters(ckpt: Any) -> tuple[int | None, int | None]:
    """Total and trainable parameters of the checkpoint's model, built on the meta device (no memory, no weights)."""
    import torch

    from aic_core.model.loading import build_model
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import spec_from_resolved

    registry = get_registry()
    try:
        spec = spec_from_resolved(ckpt.state["spec"], registry, source=str(ckpt.path / "state.json"))
        with torch.device("meta"):
            model = build_model(spec, registry, int(ckpt.state["model_config"]["vocab_size"]))
    except AicError:  # e.g. its plugin is no longer installed
        return None, None
    return model.num_params(), model.num_params(trainable_only=True)


def _host() -> dict[str, Any]:
    """The machine `aic report` runs on (at the end of `aic run`: the one that trained)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus}


def summarize(
    run_dir: Path, checkpoint: Checkpoint | None = None, parameters: tuple[int, int] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary of a run directory, and the metrics records it came from. `aic run` passes the latest
    `checkpoint` and the model's (total, trainable) `parameters` it already has; else they are read here."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    ckpt = checkpoint
    if ckpt is None and (ckpt_dir := latest_checkpoint(run_dir)) is not None:
        ckpt = open_checkpoint(ckpt_dir)
    resolved_path = run_dir / RESOLVED
    resolved = json.loads(resolved_path.read_text()) if resolved_path.is_file() else {}
    spec = ckpt.state["spec"] if ckpt is not None else resolved  # what trained the final weights
    if "train" not in spec:
        raise CheckpointError(
            f"{run_dir}: has neither a checkpoint nor {RESOLVED}, so its training settings are unknown. "
            "Pass a run directory that `aic run` wrote."
        )
    train = spec["train"]
    block_size = ckpt.state["model_config"]["block_size"] if ckpt is not None else spec["model"].get("block_size")
    tokens_per_step = train["batch_size"] * train["grad_accum"] * (train.get("seq_len") or block_size)

    train_lines = [r for r in records if _is_train(r)]
    steps = ckpt.step if ckpt is not None else train_lines[-1]["step"]
    segs = segments(records, tokens_per_step)
    wall = sum(end - start for start, _, end, _ in segs)
    trained = (
        sum(end - start for _, start, _, end in segs) * tokens_per_step
    )  # steps trained twice after a crash count twice

    val: dict[str, Any] = {}
    eval_path = run_dir / EVAL
    if eval_path.is_file():
        val = json.loads(eval_path.read_text())
        if ckpt is not None and val.get("step") != ckpt.step:
            val = {}  # from an earlier checkpoint
    if "val_loss" not in val and ckpt is not None and "val_loss" in (ckpt.state.get("metrics") or {}):
        val = {"step": ckpt.step, **ckpt.state["metrics"]}
    if "val_loss" not in val:
        val = next((r for r in reversed(records) if "val_loss" in r), {})
    total, trainable = parameters or (_parameters(ckpt) if ckpt is not None else (None, None))

    summary = {
        "run": spec.get("name", run_dir.name),
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt.path) if ckpt is not None else None,
        "steps": steps,
        "steps_planned": train["steps"],
        "tokens": steps * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "wall_time_s": round(wall, 3),
        "segments": len(segs),
        "tokens_per_s": round(trained / wall, 1) if wall > 0 else None,
        "train_loss": train_lines[-1]["loss"],
        "train_loss_step": train_lines[-1]["step"],
        "val_loss": val.get("val_loss"),
        "val_ppl": val.get("val_ppl"),
        "val_bpb": val.get("val_bpb"),
        "val_step": val.get("step"),
        "parameters": total,
        "trainable_parameters": trainable,
        "trainer": train.get("trainer", {}),
        "host_at_report": _host(),
        "versions": spec.get("versions") or resolved.get("versions") or {},
    }
    return summary, records


# --- the picture -----------------------------------------------------------------------------------


def _token_unit(tokens: float) -> tuple[float, str]:
    for scale, name in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if tokens >= scale:
            return scale, name
    return 1.0, ""


def draw(train: list[tuple[int, float]], val: list[tuple[int, float]], tokens_per_step: int, title: str) -> Any:
    """A matplotlib Figure (Agg canvas, no pyplot state): loss against steps below and tokens above."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), lw=1.2, label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, ms=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    scale, unit = _token_unit(max(s for s, _ in train) * tokens_per_step)
    per = tokens_per_step / scale
    top = ax.secondary_xaxis("top", functions=(lambda s: s * per, lambda t: t / per))
    top.set_xlabel(f"tokens ({unit})" if unit else "tokens")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _title(summary: dict[str, Any]) -> str:
    parts = [summary["run"]]
    if summary["parameters"] is not None:
        parts.append(f"{summary['parameters']:,} parameters")
    if summary["val_loss"] is not None:
        parts.append(f"final val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.3f} bits/byte")
    return " | ".join(parts)


# --- the report ------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(s: dict[str, Any]) -> list[str]:
    fmt, trainer, host = _fmt, s["trainer"], s["host_at_report"]
    rows = [
        ("steps", f"{s['steps']:,} of {s['steps_planned']:,}"),
        ("tokens", f"{s['tokens']:,} ({s['tokens_per_step']:,} a step)"),
        ("parameters", f"{fmt(s['parameters'], ',')} ({fmt(s['trainable_parameters'], ',')} trainable)"),
        (
            "wall time",
            f"{s['wall_time_s']:.1f} s" + (f" in {s['segments']} segments (resumed)" if s["segments"] > 1 else ""),
        ),
        ("tokens/s", fmt(s["tokens_per_s"], ",.0f")),
        ("train loss", f"{s['train_loss']:.4f} (step {s['train_loss_step']})"),
        (
            "val loss",
            f"{fmt(s['val_loss'], '.4f')} (ppl {fmt(s['val_ppl'], '.2f')}, {fmt(s['val_bpb'], '.4f')} bits per byte)",
        ),
        ("trainer", ", ".join(f"{k} {v}" for k, v in trainer.items())),
        ("host now", f"{host['cpu']} ({host['cpu_count']} cores); GPUs: {', '.join(host['gpus']) or 'none'}"),
    ]
    return [f"  {name:<11} {value}" for name, value in rows]


def write_report(
    run_dir: Path,
    echo: Callable[[str], None] = print,
    checkpoint: Checkpoint | None = None,
    parameters: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Write run_dir/summary.json and (with matplotlib) run_dir/report.png; echo a short table. Returns the summary."""
    run_dir = Path(run_dir)
    summary, records = summarize(run_dir, checkpoint, parameters)
    write_json(run_dir / SUMMARY, summary)
    echo(f"report: {run_dir / SUMMARY}")
    for line in _table(summary):
        echo(line)
    try:
        fig = draw(
            _last_by_step([r for r in records if _is_train(r)], "loss"),
            _last_by_step(records, "val_loss"),
            summary["tokens_per_step"],
            _title(summary),
        )
    except ImportError:
        echo(MATPLOTLIB_HINT)
        return summary
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(run_dir / PNG, buf.getvalue())
    echo(f"report: {run_dir / PNG}")
    return summary
