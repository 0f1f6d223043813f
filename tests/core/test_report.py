"""`aic report`: summary.json and report.png from a run directory; TensorBoard scalars through `train.log_to`."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from aic_core.cli import main
from aic_core.errors import SpecError
from aic_core.report import MATPLOTLIB_HINT, draw, segments
from aic_core.spec import check_log_to
from aic_core.train.common import MetricsLog
from tests.conftest import tiny_spec, write_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def reported(tmp_path_factory, corpus) -> dict:
    """A tiny run with TensorBoard logging and an evaluation at step 4, then `aic report` on it."""
    tmp = tmp_path_factory.mktemp("reported")
    spec = tiny_spec(
        corpus,
        tmp / "run",
        train={"log_to": ["jsonl", "tensorboard"], "checkpoint_every": 4},
        eval={"every": 4, "batches": 2},
    )
    assert main(["run", str(write_spec(tmp / "spec.json", spec))]) == 0
    run_dir = tmp / "run"
    after_run = (run_dir / "summary.json").is_file() and (run_dir / "report.png").is_file()
    assert main(["report", str(run_dir)]) == 0
    return {"run_dir": run_dir, "spec": spec, "report_after_run": after_run}


def test_summary_matches_the_run(reported):
    from aic_core.model.loading import load_checkpoint_model

    run_dir, spec = reported["run_dir"], reported["spec"]
    summary = json.loads((run_dir / "summary.json").read_text())
    train_lines = [r for r in records(run_dir) if "loss" in r]
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert summary["train_loss"] == train_lines[-1]["loss"]
    assert summary["val_loss"] == evaluated["val_loss"]
    assert summary["val_ppl"] == evaluated["val_ppl"]
    assert summary["val_bpb"] == evaluated["val_bpb"]
    t = spec["train"]
    assert summary["steps"] == 8
    assert (
        summary["tokens"] == 8 * t["batch_size"] * 1 * spec["model"]["block_size"]
    )  # steps x batch x grad_accum x seq_len
    model = load_checkpoint_model(run_dir).model
    assert summary["parameters"] == summary["trainable_parameters"] == model.num_params()
    assert summary["wall_time_s"] > 0 and summary["tokens_per_s"] > 0 and summary["segments"] == 1
    assert summary["trainer"]["type"] == "torch" and summary["trainer"]["device"] == "auto"
    assert set(summary["host_at_report"]) == {"cpu", "cpu_count", "gpus"}
    assert summary["versions"]["aic"]


def test_report_png_is_a_png(reported):
    data = (reported["run_dir"] / "report.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_draw_plots_training_and_validation_loss():
    train, val = [(1, 6.0), (2, 5.5), (3, 5.2), (4, 5.0)], [(2, 5.6), (4, 5.1)]
    fig = draw(train, val, tokens_per_step=1000, title="tiny | 123 parameters")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["training loss"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["training loss"].get_ydata()) == [6.0, 5.5, 5.2, 5.0]
    assert list(lines["validation loss"].get_xdata()) == [2, 4]
    assert list(lines["validation loss"].get_ydata()) == [5.6, 5.1]
    assert ax.get_xlabel() == "step" and ax.get_title() == "tiny | 123 parameters"
    (top,) = ax.child_axes  # the tokens axis: 4 steps x 1000 tokens
    assert top.get_xlabel() == "tokens (thousands)"


def test_wall_time_sums_segments_and_skips_the_pause():
    recs = [
        {"step": 1, "loss": 5.0, "tokens_per_s": 100.0, "time": 1000.0},  # 100 tokens a step: began at 999
        {"step": 2, "loss": 4.9, "tokens_per_s": 100.0, "time": 1001.0},
        {"step": 2, "val_loss": 5.0, "time": 1001.5},
        {"step": 3, "loss": 4.8, "tokens_per_s": 100.0, "time": 1002.0},  # then killed; checkpoint at step 2
        {"event": "resume", "step": 2, "time": 5000.0},  # an hour later
        {"step": 3, "loss": 4.8, "tokens_per_s": 100.0, "time": 5001.0},
        {"step": 4, "loss": 4.7, "tokens_per_s": 100.0, "time": 5002.0},
        {"stage": "eval", "step": 4, "val_loss": 4.9, "time": 9000.0},  # the eval stage is not training
    ]
    segs = segments(recs, tokens_per_step=100)
    assert segs == [(999.0, 0, 1002.0, 3), (5000.0, 2, 5002.0, 4)]
    assert sum(end - start for start, _, end, _ in segs) == 5.0


def test_report_without_matplotlib_writes_the_summary_and_a_hint(reported, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reported["run_dir"], run_dir)
    (run_dir / "summary.json").unlink()
    (run_dir / "report.png").unlink()
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now fails as if it were not installed
    assert main(["report", str(run_dir)]) == 0
    assert MATPLOTLIB_HINT in capsys.readouterr().out
    assert (run_dir / "summary.json").is_file() and not (run_dir / "report.png").exists()


def test_report_needs_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "not found" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_metrics_log_writes_tensorboard_scalars(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    log.write(step=1, loss=5.5, lr=1e-3, tokens_per_s=1234.5)
    log.write(step=2, loss=5.25, lr=2e-3, tokens_per_s=2345.5)
    log.write(step=2, val_loss=5.4, val_ppl=221.4, val_bpb=4.5)
    log.close()
    got = scalars(tmp_path / "tb")
    assert set(got) == {"train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/ppl", "val/bpb"}
    for rec in records(tmp_path):
        for key, value in rec.items():
            if key not in ("step", "time"):
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                assert got[tag][rec["step"]] == pytest.approx(value, rel=1e-6)


def test_tensorboard_after_a_resume_keeps_the_new_values_of_steps_trained_again(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    for step, loss in ((1, 6.0), (2, 5.0), (3, 4.0)):  # killed after step 3; the checkpoint is at step 2
        log.write(step=step, loss=loss)
    log.close()
    time.sleep(1.1)  # event files are ordered by their names' time stamps (seconds)
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    log.write(event="resume", step=2)
    log.write(step=3, loss=3.5)
    log.close()
    assert scalars(tmp_path / "tb")["train/loss"] == {1: 6.0, 2: 5.0, 3: 3.5}


def test_tensorboard_missing_is_a_spec_error(tmp_path, monkeypatch):
    from types import SimpleNamespace

    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    check_log_to(SimpleNamespace(train=SimpleNamespace(log_to=["jsonl"])))
    with pytest.raises(SpecError, match=r'train\.log_to.*pip install "aic\[tensorboard\]"'):
        check_log_to(SimpleNamespace(train=SimpleNamespace(log_to=["jsonl", "tensorboard"])))
    with pytest.raises(SpecError, match=r"train\.log_to"):
        MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")


def test_log_to_accepts_only_known_sinks(tmp_path, corpus):
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import parse_spec

    spec = parse_spec(tiny_spec(corpus, tmp_path / "run"), get_registry())
    assert spec.train.log_to == ["jsonl"]
    with pytest.raises(SpecError, match=r"train\.log_to"):
        parse_spec(tiny_spec(corpus, tmp_path / "run", train={"log_to": ["csv"]}), get_registry())


# --- end to end: these pass once `aic run` calls write_report and the torch trainer passes train.log_to --------


def test_run_writes_the_report(reported):
    assert reported["report_after_run"], (
        "aic run did not write summary.json and report.png (run.py must call write_report)"
    )


def test_run_with_log_to_tensorboard_writes_events(reported):
    run_dir = reported["run_dir"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), (
        "the torch trainer did not pass train.log_to to MetricsLog"
    )
    got = scalars(run_dir / "tensorboard")
    for rec in records(run_dir):
        if rec.get("stage") is None and "loss" in rec:
            assert got["train/loss"][rec["step"]] == pytest.approx(rec["loss"], rel=1e-6)
            assert got["train/lr"][rec["step"]] == pytest.approx(rec["lr"], rel=1e-6)
        if rec.get("stage") is None and "val_loss" in rec:
            assert got["val/bpb"][rec["step"]] == pytest.approx(rec["val_bpb"], rel=1e-6)
    assert set(got["val/loss"]) == {4, 8}
