"""The example specs run end to end as shipped (with fewer steps, so the suite stays fast)."""

from __future__ import annotations

import json

import pytest

from aic_core.cli import main
from aic_core.run import load_checkpoint_model
from tests.conftest import REPO, write_spec

EXAMPLES = REPO / "examples"


@pytest.mark.parametrize("name", ["austen-tiny", "tinyllama-tiny"])
def test_example_spec_runs_end_to_end(tmp_path, name):
    spec = json.loads((EXAMPLES / f"{name}.json").read_text())
    spec["data"]["train"] = [str(EXAMPLES / p) for p in spec["data"]["train"]]
    spec["output_dir"] = str(tmp_path / "run")
    spec["train"].update(steps=3, checkpoint_every=0, warmup_steps=1)
    spec["eval"].update(every=0, batches=1)
    spec["generate"]["max_new_tokens"] = 8
    assert main(["validate", str(EXAMPLES / f"{name}.json")]) == 0  # the shipped file itself is valid
    assert main(["run", str(write_spec(tmp_path / "spec.json", spec))]) == 0
    assert (tmp_path / "run" / "samples.txt").read_text().count("=== sample") == len(spec["generate"]["prompts"])
    loaded = load_checkpoint_model(tmp_path / "run")
    assert (loaded.spec.model.type, loaded.spec.model.positional.type) == (spec["model"]["type"], spec["model"]["positional"]["type"])


def test_lora_example_fine_tunes_the_built_in_example(tmp_path):
    """examples/austen-lora.json as shipped, with its base at ../runs/austen-tiny (fewer steps; the shipped novel as data)."""
    base = json.loads((EXAMPLES / "austen-tiny.json").read_text())
    base["data"]["train"] = [str(EXAMPLES / p) for p in base["data"]["train"]]
    base["output_dir"] = str(tmp_path / "runs" / "austen-tiny")
    base["train"].update(steps=3, checkpoint_every=0, warmup_steps=1)
    base["eval"].update(every=0, batches=1)
    base["generate"]["prompts"] = []
    assert main(["run", str(write_spec(tmp_path / "base.json", base))]) == 0
    spec = json.loads((EXAMPLES / "austen-lora.json").read_text())
    assert spec["model"] == {"init_from": "../runs/austen-tiny"} and spec["adapter"]["type"] == "lora"
    spec["data"]["train"] = [str(EXAMPLES / "data" / "persuasion.txt")]
    spec["output_dir"] = str(tmp_path / "runs" / "austen-lora")
    spec["train"].update(steps=3, checkpoint_every=0, warmup_steps=1)
    spec["eval"].update(every=0, batches=1)
    spec["generate"]["max_new_tokens"] = 8
    (tmp_path / "examples").mkdir()
    assert main(["run", str(write_spec(tmp_path / "examples" / "austen-lora.json", spec))]) == 0
    loaded = load_checkpoint_model(tmp_path / "runs" / "austen-lora")
    assert loaded.spec.adapter.type == "lora" and (loaded.checkpoint.path / "adapter.safetensors").is_file()
