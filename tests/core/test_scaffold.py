"""`aic new-plugin`'s templates are code: Python files in aic_core/authoring/templates/ that import as they stand
(their placeholders are names: aic_NAME, NameModel), shipped as package data, filled into a package whose plugin
registers and validates its options without being installed. test_plugin_packages.py installs the generated
packages and runs their own tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from aic_core.authoring import scaffold
from aic_core.authoring.testing import check_options, check_registration
from aic_core.plugins import KIND_HOOKS, KINDS
from aic_core.plugins.kinds import BASES

TEMPLATES = Path(scaffold.__file__).parent / "templates"


def _import(path: Path, name: str):
    """The module at `path`, imported under `name` (in sys.modules while it runs, as pydantic needs)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_there_is_a_template_folder_for_each_kind_and_the_shared_files():
    assert sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        [*KINDS, "package"]
    )
    for kind in KINDS:
        assert {"plugin.py", "plugin_tests.py", "use.md"} <= {p.name for p in (TEMPLATES / kind).iterdir()}
    assert {"pyproject.toml", "README.md", "__init__.py"} <= {p.name for p in (TEMPLATES / "package").iterdir()}


@pytest.mark.parametrize("kind", KINDS)
def test_each_plugin_template_imports_as_it_stands_and_registers_its_kind(kind):
    module = _import(TEMPLATES / kind / "plugin.py", f"aic_template_{kind}")
    classes = [
        v for v in vars(module).values() if isinstance(v, type) and issubclass(v, BASES[kind]) and v is not BASES[kind]
    ]
    assert [c.name for c in classes] == ["NAME"]
    registered: list[type] = []
    getattr(module, KIND_HOOKS[kind])(registered.append)
    assert registered == classes
    compile((TEMPLATES / kind / "plugin_tests.py").read_text(), "plugin_tests.py", "exec")  # imports aic_NAME


@pytest.mark.parametrize("kind", KINDS)
def test_the_filled_package_names_everything_after_the_plugin(kind, tmp_path, monkeypatch):
    folder = scaffold.new_plugin(kind, f"fresh-{kind}", tmp_path / "pkg")
    package = f"aic_fresh_{kind}"
    texts = {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}
    assert set(texts) == {
        "pyproject.toml",
        "README.md",
        f"{package}/__init__.py",
        f"{package}/plugin.py",
        f"tests/test_{package}.py",
    }
    assert not any(scaffold._PLACEHOLDER.search(text) for text in texts.values())
    assert f'fresh-{kind} = "{package}.plugin"' in texts["pyproject.toml"]
    assert f'name = "aic-fresh-{kind}"' in texts["pyproject.toml"]
    assert f"The `fresh-{kind}` {kind} plugin for aic" in texts["README.md"]
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(f"{package}.plugin")
    try:
        (cls,) = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, BASES[kind])]
        assert cls.name == f"fresh-{kind}" and cls.__name__.startswith(f"Fresh{kind.capitalize()}")
        check_options(cls, {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16} if kind == "model" else {})
        check_registration(cls)
    finally:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
