"""The registry's guarantees where users meet them, on the `aic` command: broken third-party plugins are
reported and skipped, so `aic plugins`, `aic validate`, `aic schema` and an unrelated `aic run` still
succeed; `--strict` (or AIC_STRICT_PLUGINS=1) makes them fail with exit 2 and one clear message; AIC_PLUGINS
pins which third-party distributions load. The broken plugins are real distributions (dist-info folders
with entry points) in a folder put on the path, so discovery is exactly the installed one."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from aic_core.cli import main
from aic_core.plugins import registry as registry_module
from tests.conftest import tiny_spec, write_spec
from tests.installing import AIC, run

HEADER = (
    "from typing import Callable\n"
    "from aic_core.plugins.hookspecs import hookimpl\n"
    "from aic_core.plugins.kinds import ModelPlugin, PluginOptions, Positional, PositionalPlugin\n"
)
# distribution -> (entry-point name, module name, module source)
FAKES = {
    "aic-broken-import": (
        "broken-import",
        "aic_fake_broken_import",
        "import aic_fake_dependency_that_is_not_installed\n",
    ),
    "aic-raising-hook": (
        "raising-hook",
        "aic_fake_raising_hook",
        """
        @hookimpl
        def aic_register_models(register):
            raise RuntimeError("the hook broke")
    """,
    ),
    "aic-duplicate": (
        "duplicate",
        "aic_fake_duplicate",
        """
        class Impostor(ModelPlugin):
            name = "gpt2"

            def config(self, options, vocab_size):
                raise NotImplementedError

        @hookimpl
        def aic_register_models(register):
            register(Impostor)
    """,
    ),
    "aic-bad-options": (
        "bad-options",
        "aic_fake_bad_options",
        """
        class PlainOptions:
            base: float = 1.0

        class NotPydantic(PositionalPlugin):
            name = "not-pydantic"
            Options = PlainOptions

            def build(self, options, config):
                return Positional()

        class NoSchema(PositionalPlugin):
            name = "no-schema"

            class Options(PluginOptions):
                callback: Callable = print

            def build(self, options, config):
                return Positional()

        @hookimpl
        def aic_register_positional_encodings(register):
            register(NotPydantic)
            register(NoSchema)
    """,
    ),
    "aic-good-third": (
        "good-third",
        "aic_fake_good_third",
        """
        class NoPositions(PositionalPlugin):
            name = "nope-test"
            extrapolates = True

            def build(self, options, config):
                return Positional()

        @hookimpl
        def aic_register_positional_encodings(register):
            register(NoPositions)
    """,
    ),
}
BROKEN = {"aic-broken-import", "aic-raising-hook", "aic-bad-options"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder of installed-looking distributions: module + NAME-1.0.dist-info/{METADATA, entry_points.txt}."""
    site = tmp_path_factory.mktemp("site")
    for dist, (ep_name, module, source) in FAKES.items():
        (site / f"{module}.py").write_text(HEADER + textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[aic]\n{ep_name} = {module}\n")
    return site


@pytest.fixture
def with_fakes(site, monkeypatch):
    """This process sees the fake distributions, with a fresh registry (restored afterwards)."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry_module, "_default", None)
    monkeypatch.delenv("AIC_PLUGINS", raising=False)
    monkeypatch.delenv("AIC_STRICT_PLUGINS", raising=False)
    return site


def plugins_json(capsys) -> dict[str, list[dict]]:
    out = json.loads(capsys.readouterr().out)
    by_dist: dict[str, list[dict]] = {}
    for record in out:
        by_dist.setdefault(record["distribution"], []).append(record)
    return by_dist


def test_aic_plugins_shows_each_broken_plugin_and_still_succeeds(with_fakes, capsys):
    with pytest.warns(UserWarning, match=r"aic plugin conflict: model plugin 'gpt2' from aic-duplicate"):
        assert main(["plugins", "--json"]) == 0
    dists = plugins_json(capsys)
    (broken,) = dists["aic-broken-import"]
    assert (broken["status"], broken["kind"], broken["name"]) == ("error", "-", "broken-import")
    assert (
        "import failed: ModuleNotFoundError: No module named 'aic_fake_dependency_that_is_not_installed'"
        in broken["error"]
    )
    (raising,) = dists["aic-raising-hook"]
    assert (
        raising["status"] == "error"
        and "hook aic_register_models raised RuntimeError: the hook broke" in raising["error"]
    )
    bad = {r["name"]: r for r in dists["aic-bad-options"]}
    assert (
        bad["not-pydantic"]["status"] == "error" and "Options must be a Pydantic model" in bad["not-pydantic"]["error"]
    )
    assert (
        bad["no-schema"]["status"] == "error"
        and "NoSchema.Options is not a valid Pydantic model" in bad["no-schema"]["error"]
    )
    # The same name as a built-in: the built-in wins, the other is a conflict naming both sources.
    (impostor,) = dists["aic-duplicate"]
    assert impostor["status"] == "conflict" and impostor["kind"] == "model"
    assert (
        "the one loaded first (aic) is used" in impostor["error"]
        and "gpt2 = aic_plugins.models.gpt2" in impostor["error"]
    )
    assert {(r["name"], r["status"]) for r in dists["aic"]} >= {("gpt2", "ok"), ("learned", "ok")}
    assert [(r["name"], r["status"]) for r in dists["aic-good-third"]] == [("nope-test", "ok")]

    assert main(["plugins"]) == 0  # the table, then one paragraph per problem
    out = capsys.readouterr().out
    assert "broken-import (broken-import = aic_fake_broken_import): error: import failed" in out
    assert "gpt2 (duplicate = aic_fake_duplicate): conflict:" in out


def test_validate_schema_and_an_unrelated_run_succeed_next_to_broken_plugins(with_fakes, tmp_path, corpus, capsys):
    spec = tiny_spec(corpus, tmp_path / "run", train={"steps": 2}, generate={"prompts": ["Anne"], "max_new_tokens": 4})
    path = write_spec(tmp_path / "spec.json", spec)
    with pytest.warns(UserWarning, match="conflict"):
        assert main(["validate", str(path)]) == 0
    assert "valid (gpt2 + learned" in capsys.readouterr().out
    assert main(["schema"]) == 0
    schema = capsys.readouterr().out
    assert '"nope-test"' in schema and '"no-schema"' not in schema and '"not-pydantic"' not in schema
    assert main(["run", str(path)]) == 0
    assert (tmp_path / "run" / "samples.txt").is_file()
    resolved = json.loads((tmp_path / "run" / "spec.resolved.json").read_text())
    assert resolved["versions"]["plugins"]["model"].startswith("gpt2 (aic ")  # the built-in, not the impostor


def test_a_spec_naming_a_broken_plugin_says_it_failed_to_load(with_fakes, tmp_path, corpus, capsys):
    spec = tiny_spec(corpus, tmp_path / "run")
    spec["model"]["positional"] = {"type": "no-schema"}
    with pytest.warns(UserWarning):
        assert main(["validate", str(write_spec(tmp_path / "spec.json", spec))]) == 2
    err = capsys.readouterr().err
    assert "model.positional.type: unknown positional plugin 'no-schema'" in err
    assert "Run `aic plugins` to see all plugins and any that failed to load." in err


@pytest.mark.parametrize("how", ["--strict before the command", "--strict after the command", "AIC_STRICT_PLUGINS=1"])
@pytest.mark.parametrize("command", ["plugins", "validate", "run"])
def test_strict_mode_fails_with_exit_2_and_names_the_broken_plugin(
    with_fakes, tmp_path, corpus, capsys, monkeypatch, how, command
):
    args = [command] + (
        [str(write_spec(tmp_path / "spec.json", tiny_spec(corpus, tmp_path / "run")))] if command != "plugins" else []
    )
    if how == "AIC_STRICT_PLUGINS=1":
        monkeypatch.setenv("AIC_STRICT_PLUGINS", "1")
    else:
        args = ["--strict", *args] if how.endswith("before the command") else [*args, "--strict"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("aic: error: plugin '") and "Traceback" not in err and err.count("\n") == 1
    assert "from aic-bad-options 1.0 (bad-options = aic_fake_bad_options) failed" in err  # the first broken one to load
    assert "Strict plugin loading is on (--strict or AIC_STRICT_PLUGINS=1); fix or uninstall the plugin" in err
    assert not (tmp_path / "run").exists()


def test_aic_plugins_pins_the_third_party_distributions_that_load(with_fakes, capsys, monkeypatch):
    monkeypatch.setenv("AIC_PLUGINS", "aic_good_third")  # names are normalised: aic-good-third
    assert main(["--strict", "plugins", "--json"]) == 0  # nothing broken loads, so strict mode has nothing to refuse
    dists = plugins_json(capsys)
    assert [(r["name"], r["status"]) for r in dists["aic-good-third"]] == [("nope-test", "ok")]
    for dist in BROKEN | {"aic-duplicate"}:
        (record,) = dists[dist]
        assert (
            record["status"] == "skipped" and record["error"] == f"distribution '{dist}' is not listed in AIC_PLUGINS"
        )
    assert all(r["status"] == "ok" for r in dists["aic"])  # the built-ins always load

    monkeypatch.setattr(registry_module, "_default", None)
    monkeypatch.setenv("AIC_PLUGINS", "")  # set but empty: the built-ins only
    assert main(["plugins", "--json"]) == 0
    assert {r["status"] for d, records in plugins_json(capsys).items() if d != "aic" for r in records} == {"skipped"}


def test_the_aic_command_in_a_fresh_process_reports_and_skips_broken_plugins(site):
    done = run([*AIC, "plugins"], PYTHONPATH=str(site))
    assert done.returncode == 0, done.stderr
    assert re.search(r"^broken-import +- +aic-broken-import +1\.0 +error$", done.stdout, re.MULTILINE)
    assert "aic plugin conflict: model plugin 'gpt2' from aic-duplicate" in done.stderr  # the warning
    done = run([*AIC, "--strict", "plugins"], PYTHONPATH=str(site))
    assert done.returncode == 2
    assert (
        done.stderr.startswith("aic: error: plugin 'not-pydantic' from aic-bad-options 1.0")
        and "Traceback" not in done.stderr
    )
