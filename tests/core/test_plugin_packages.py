"""Third-party plugin packages for real: the example package and `aic new-plugin` packages are pip-installed
into this environment, found through their entry points, used by `aic`, tested with their own tests, and
uninstalled afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from aic_core.cli import main
from aic_core.model.loading import load_spec
from aic_core.plugins.kinds import KINDS
from aic_core.plugins.registry import Registry
from aic_core.spec import json_schema
from tests.conftest import REPO, write_spec
from tests.installing import AIC, copy_package, installed, run

EXAMPLE = REPO / "examples" / "aic-plugin-example"
EXAMPLE_PLUGINS = {("positional", "sinusoidal"), ("model", "gpt-relu2"), ("tokenizer", "bytes")}


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    src = copy_package(EXAMPLE, tmp_path_factory.mktemp("example") / "aic-plugin-example")
    with installed([src], ["aic-plugin-example"]):
        yield src


def test_aic_plugins_lists_the_example_packages_plugins(example):
    done = run([*AIC, "plugins", "--json"])
    assert done.returncode == 0, done.stderr
    ours = {(r["kind"], r["name"]): r for r in json.loads(done.stdout) if r["distribution"] == "aic-plugin-example"}
    assert set(ours) == EXAMPLE_PLUGINS
    assert all(r["status"] == "ok" and r["version"] == "0.1.0" and r["error"] is None for r in ours.values())
    assert ours[("model", "gpt-relu2")]["source"] == "gpt-relu2 = aic_plugin_example.model"


def test_the_example_options_are_in_the_schema_and_its_spec_validates(example):
    registry = Registry(strict=True)  # fresh: it sees the package installed after this process started
    schema = json.dumps(json_schema(registry))
    for key in ('"sinusoidal"', '"gpt-relu2"', '"bytes"', '"mlp_ratio"', '"eos"'):
        assert key in schema, key
    spec = load_spec(EXAMPLE / "spec.json", registry)
    assert (spec.model.type, spec.model.positional.type, spec.tokenizer.type) == ("gpt-relu2", "sinusoidal", "bytes")
    assert spec.data.train == [str(REPO / "examples" / "data" / "persuasion.txt")]


def test_a_spec_using_all_three_example_plugins_runs_end_to_end(example, tmp_path):
    spec = json.loads((EXAMPLE / "spec.json").read_text())
    spec["data"]["train"] = [str(REPO / "examples" / "data" / "persuasion.txt")]
    spec["output_dir"] = str(tmp_path / "run")
    spec["train"].update(steps=3, warmup_steps=1, log_every=1)
    spec["eval"]["batches"] = 1
    spec["generate"]["max_new_tokens"] = 8
    done = run([*AIC, "run", str(write_spec(tmp_path / "spec.json", spec))])
    assert done.returncode == 0, done.stderr
    assert "model: gpt-relu2 + sinusoidal" in done.stdout
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "tokenizer.model").read_text())["format"] == "aic-plugin-example/bytes"
    assert (run_dir / "samples.txt").read_text().startswith("=== sample 1 (step 3) ===\nAnne Elliot")
    versions = json.loads((run_dir / "spec.resolved.json").read_text())["versions"]["plugins"]
    assert versions["model"] == "gpt-relu2 (aic-plugin-example 0.1.0)"
    assert versions["model.positional"] == "sinusoidal (aic-plugin-example 0.1.0)"
    assert versions["tokenizer"] == "bytes (aic-plugin-example 0.1.0)"


def test_the_example_packages_own_tests_pass(example):
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example / "tests")], cwd=example)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


# --- aic new-plugin ------------------------------------------------------------------------------------


def test_new_plugin_packages_of_every_kind_install_register_pass_their_own_tests_and_run(tmp_path, corpus, capsys):
    folders = []
    for kind in KINDS:
        assert main(["new-plugin", kind, f"scaffold-{kind}", "--dir", str(tmp_path / kind)]) == 0
        folders.append(tmp_path / kind)
    assert f"wrote the trainer plugin 'scaffold-trainer' to {tmp_path / 'trainer'}" in capsys.readouterr().out
    assert {
        p.relative_to(tmp_path / "adapter").as_posix() for p in (tmp_path / "adapter").rglob("*") if p.is_file()
    } == {
        "pyproject.toml",
        "README.md",
        "aic_scaffold_adapter/__init__.py",
        "aic_scaffold_adapter/plugin.py",
        "tests/test_aic_scaffold_adapter.py",
    }
    with installed(folders, [f"aic-scaffold-{kind}" for kind in KINDS]):
        done = run([*AIC, "plugins", "--json"])
        assert done.returncode == 0, done.stderr
        records = {
            (r["kind"], r["name"]): r["status"]
            for r in json.loads(done.stdout)
            if r["distribution"].startswith("aic-scaffold-")
        }
        assert records == {(kind, f"scaffold-{kind}"): "ok" for kind in KINDS}
        done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, folders)], cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert f"{4 * len(KINDS)} passed" in done.stdout  # options, registration, the kind's contract, the entry point
        # All five generated plugins in one run, as generated.
        spec = {
            "name": "scaffolded",
            "output_dir": str(tmp_path / "run"),
            "data": {"train": [str(corpus)]},
            "tokenizer": {"type": "scaffold-tokenizer"},
            "model": {
                "type": "scaffold-model",
                "n_layer": 2,
                "n_head": 2,
                "n_embd": 32,
                "block_size": 32,
                "positional": {"type": "scaffold-positional"},
            },
            "adapter": {"type": "scaffold-adapter"},
            "train": {"trainer": {"type": "scaffold-trainer"}, "steps": 3, "batch_size": 2, "log_every": 1},
            "eval": {"batches": 1},
            "generate": {"prompts": ["Anne"], "max_new_tokens": 8},
        }
        done = run([*AIC, "run", str(write_spec(tmp_path / "spec.json", spec))])
        assert done.returncode == 0, done.stderr[-3000:]
        assert (
            "model: scaffold-model + scaffold-positional" in done.stdout
            and "scaffold-adapter: 256 trainable" in done.stdout
        )
        assert (tmp_path / "run" / "checkpoints" / "step-3" / "adapter.safetensors").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["modle", "x"],
            "new-plugin KIND: unknown plugin kind 'modle' (did you mean 'model'?). Choose one of: model, positional",
        ),
        (["model", "My Model"], "new-plugin NAME: 'My Model' is not a plugin name. Use at most 40 lower-case letters"),
        (["model", "x--y"], "(e.g. 'x-y')"),
        (["model", "core"], "new-plugin NAME: 'core' would make the import package aic_core, which is aic's own"),
        (["positional", "rope"], "new-plugin NAME: a positional plugin named 'rope' is already installed (aic "),
    ],
)
def test_new_plugin_refuses_bad_arguments_with_one_clear_line(tmp_path, capsys, argv, message):
    assert main(["new-plugin", *argv, "--dir", str(tmp_path / "pkg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aic: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "pkg").exists()


def test_new_plugin_never_writes_into_a_folder_that_is_not_empty(tmp_path, capsys, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    assert main(["new-plugin", "model", "mine", "--dir", str(tmp_path / "pkg")]) == 2
    assert (
        f"--dir: {tmp_path / 'pkg'} already exists and is not an empty folder; nothing was written"
        in capsys.readouterr().err
    )
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["keep.txt"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["new-plugin", "model", "mine", "--dir", str(tmp_path / "empty")]) == 0  # an empty folder is fine
    assert main(["new-plugin", "model", "mine"]) == 0  # default: ./aic-NAME
    assert (tmp_path / "aic-mine" / "aic_mine" / "plugin.py").is_file()
    assert main(["new-plugin", "model", "mine"]) == 2
    assert "new-plugin (the default folder ./aic-NAME): " in capsys.readouterr().err
