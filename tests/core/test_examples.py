"""The example specs run end to end exactly as shipped: their data paths untouched, from a copy of the
examples folder (so the runs land in a temporary folder), with fewer steps so the suite stays fast.

The only overrides: train.steps 3 and warmup_steps 1, eval.batches 1, generate.max_new_tokens 8 (time);
the runs go to the default output_dir, runs/<name>, under the temporary working directory."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from aic_core.cli import main
from aic_core.model.loading import load_checkpoint_model
from tests.conftest import REPO

EXAMPLES = REPO / "examples"


def spec_files() -> list[Path]:
    """Every spec the repository ships: a JSON file with a data section, anywhere under examples/."""
    found = []
    for path in sorted(EXAMPLES.rglob("*.json")):
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and "data" in raw:
            found.append(path)
    return found


def shipped_copy(tmp_path: Path) -> Path:
    """examples/ copied to tmp_path/examples (specs and their data, not the plugin package)."""
    dest = tmp_path / "examples"
    shutil.copytree(EXAMPLES, dest, ignore=shutil.ignore_patterns("aic-plugin-example"))
    return dest


def shorten(spec_path: Path) -> dict:
    """Fewer steps, eval batches and generated tokens; nothing else (data paths above all) changes."""
    spec = json.loads(spec_path.read_text())
    shipped = json.loads((EXAMPLES / spec_path.name).read_text())
    spec["train"].update(steps=3, warmup_steps=1)
    spec["eval"]["batches"] = 1
    spec["generate"]["max_new_tokens"] = 8
    spec_path.write_text(json.dumps(spec, indent=2))
    assert {k: v for k, v in spec.items() if k not in ("train", "eval", "generate")} == {
        k: v for k, v in shipped.items() if k not in ("train", "eval", "generate")
    }
    return spec


def test_every_example_spec_reads_data_inside_the_repository():
    """A clean clone has nothing beside it: every data file an example names is in the repository, not ignored."""
    specs = spec_files()
    assert {p.name for p in specs} >= {"austen-tiny.json", "tinyllama-tiny.json", "austen-lora.json"}
    repo = REPO.resolve()
    git = shutil.which("git") and (REPO / ".git").exists()
    for spec_path in specs:
        data = json.loads(spec_path.read_text())["data"]
        for field in ("train", "val"):
            for i, name in enumerate(data.get(field, [])):
                path = (spec_path.parent / name).resolve()
                where = f"{spec_path.relative_to(REPO)}: data.{field}[{i}] = {name!r}"
                assert path.is_relative_to(repo), f"{where} is outside the repository ({path})"
                assert path.is_file() and path.stat().st_size > 0, f"{where}: no such file in the repository ({path})"
                if git:
                    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(path)], check=False)
                    assert ignored.returncode == 1, f"{where}: {path} is ignored by git, so a clone would not have it"


@pytest.mark.parametrize("name", ["austen-tiny", "tinyllama-tiny"])
def test_example_spec_runs_end_to_end(tmp_path, monkeypatch, name):
    examples = shipped_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(EXAMPLES / f"{name}.json")]) == 0  # the shipped file itself is valid
    spec = shorten(examples / f"{name}.json")
    assert main(["run", str(examples / f"{name}.json")]) == 0
    run_dir = tmp_path / "runs" / name
    assert (run_dir / "samples.txt").read_text().count("=== sample") == len(spec["generate"]["prompts"])
    loaded = load_checkpoint_model(run_dir)
    assert (loaded.spec.model.type, loaded.spec.model.positional.type) == (
        spec["model"]["type"],
        spec["model"]["positional"]["type"],
    )
    assert loaded.spec.data.train == [str((examples / p).resolve()) for p in spec["data"]["train"]]


def test_lora_example_fine_tunes_the_built_in_example(tmp_path, monkeypatch):
    """The README's LoRA section from the repository root: austen-tiny first, then examples/austen-lora.json
    as shipped (model.init_from ../runs/austen-tiny, data/northangerabbey.txt)."""
    examples = shipped_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    shorten(examples / "austen-tiny.json")
    assert main(["run", "examples/austen-tiny.json"]) == 0
    spec = shorten(examples / "austen-lora.json")
    assert spec["model"] == {"init_from": "../runs/austen-tiny"} and spec["adapter"]["type"] == "lora"
    assert spec["data"]["train"] == ["data/northangerabbey.txt"]
    assert main(["validate", "examples/austen-lora.json"]) == 0
    assert main(["run", "examples/austen-lora.json"]) == 0
    loaded = load_checkpoint_model(tmp_path / "runs" / "austen-lora")
    assert loaded.spec.adapter.type == "lora" and (loaded.checkpoint.path / "adapter.safetensors").is_file()
    assert loaded.spec.data.train == [str((examples / "data" / "northangerabbey.txt").resolve())]
