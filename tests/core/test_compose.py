"""Any model with any positional encoding: each pair trains through `aic run` and decodes consistently."""

from __future__ import annotations

import json

import pytest

from aic_core.cli import main
from aic_core.generate import generate
from aic_core.model.loading import load_checkpoint_model
from aic_core.spec import SamplerSpec
from tests.conftest import tiny_spec, write_spec

MODELS = {
    "gpt2": {"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "llama": {
        "type": "llama",
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "n_embd": 32,
        "mlp_hidden": 64,
        "block_size": 32,
    },
}


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("model", list(MODELS))
def test_model_with_positional_trains_and_greedy_cache_equals_recompute(tmp_path, corpus, model, positional):
    section = {**MODELS[model], "positional": {"type": positional}}
    spec = tiny_spec(
        corpus, tmp_path / "run", model=section, train={"steps": 4}, generate={"prompts": ["Anne"], "max_new_tokens": 8}
    )
    spec["model"] = section
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    losses = [
        r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # trained 4 steps, no NaN
    loaded = load_checkpoint_model(tmp_path / "run")
    assert type(loaded.model.positional).__module__.endswith(positional)
    greedy = SamplerSpec(temperature=0)
    prompts = ["Anne was", "It"]
    assert generate(loaded.model, loaded.tokenizer, prompts, 10, greedy) == generate(
        loaded.model, loaded.tokenizer, prompts, 10, greedy, use_cache=False
    )
