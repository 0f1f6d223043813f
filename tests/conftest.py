"""Shared fixtures: a small corpus from the shipped example and a tiny spec that trains in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CORPUS = REPO / "examples" / "data" / "persuasion.txt"


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    for item in items:
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs several CUDA GPUs"))
        elif "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AIC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aic-cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 60 KB of the example novel, cut at a line end."""
    text = EXAMPLE_CORPUS.read_text(encoding="utf-8")[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text[: text.rindex("\n") + 1], encoding="utf-8")
    return path


def tiny_spec(corpus: Path, run_dir: Path, **overrides) -> dict:
    spec = {
        "name": "tiny",
        "seed": 7,
        "output_dir": str(run_dir),
        "data": {"train": [str(corpus)]},
        "tokenizer": {"type": "sentencepiece", "vocab_size": 400},
        "model": {"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1},
        "train": {"steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1},
        "eval": {"batches": 2},
        "generate": {"prompts": ["Anne", "Captain Wentworth was"], "max_new_tokens": 12},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec, indent=2))
    return path
