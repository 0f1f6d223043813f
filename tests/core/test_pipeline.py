"""One `aic run` opens each thing once: the stages share a RunContext instead of reopening files or rebuilding
models (bench/run_counts.py prints the same counts for the example's shape)."""

from __future__ import annotations

import builtins
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from aic_core.model import loading
from aic_core.model.nn.transformer import Transformer
from aic_core.run import run
from tests.conftest import tiny_spec, write_spec


@pytest.fixture()
def counts(monkeypatch) -> Counter:
    """Calls of open_source, Transformer builds (meta-device ones included) and reads of any state.json."""
    seen: Counter = Counter()
    init, open_source, real_open = Transformer.__init__, loading.open_source, builtins.open

    def counting_init(self, *args, **kwargs):
        seen["builds"] += 1
        init(self, *args, **kwargs)

    def counting_open_source(*args, **kwargs):
        seen["open_source"] += 1
        return open_source(*args, **kwargs)

    def counting_open(file, mode="r", *args, **kwargs):
        if Path(str(file)).name == "state.json" and "r" in mode:
            seen["state.json reads"] += 1
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(Transformer, "__init__", counting_init)
    monkeypatch.setattr(loading, "open_source", counting_open_source)
    monkeypatch.setattr("aic_core.run.open_source", counting_open_source)
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return seen


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus) -> Path:
    tmp = tmp_path_factory.mktemp("pipeline")
    overrides = {"train": {"steps": 2, "log_every": 1, "checkpoint_every": 0}, "eval": {"batches": 1}}
    spec = write_spec(tmp / "base.json", tiny_spec(corpus, tmp / "base", **overrides))
    run(spec, echo=lambda _: None)
    return spec


def test_a_run_builds_its_model_once_besides_the_plan_and_reads_its_state_once(counts, corpus, tmp_path):
    overrides = {"train": {"steps": 2, "log_every": 1, "checkpoint_every": 0}, "eval": {"batches": 1}}
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run", **overrides))
    run(spec, echo=lambda _: None)
    # The plan's meta-device count, then the model trained; eval, generate and the report use that one.
    assert counts["builds"] == 2
    assert counts["state.json reads"] == 1  # the checkpoint training wrote, opened once for eval and generate


def test_eval_and_generate_load_the_checkpoint_once(counts, base_run):
    run(base_run, stages=["eval", "generate"], echo=lambda _: None)
    assert counts["builds"] == 1
    assert counts["state.json reads"] == 1


def test_an_init_from_source_is_opened_once(counts, base_run, tmp_path):
    spec = json.loads(Path(base_run).read_text())
    base_dir = spec["output_dir"]
    spec.update(
        name="lora",
        output_dir=str(tmp_path / "lora"),
        model={"init_from": base_dir},
        adapter={"type": "lora", "r": 2, "alpha": 4},
    )
    spec.pop("tokenizer")
    run(write_spec(tmp_path / "lora.json", spec), echo=lambda _: None)
    assert counts["open_source"] == 1  # its sections, its weights and its tokenizer, from one opening
    # The plan's one-block count (which checks the adapter's targets too) and the model trained.
    assert counts["builds"] == 2
    # The base's state.json once (by that opening), the run's own checkpoint once.
    assert counts["state.json reads"] == 2
