"""`aic new-plugin KIND NAME`: write a plugin package that installs, registers and passes its own tests.

    aic-NAME/
      pyproject.toml          the entry point: NAME = "aic_NAME.plugin" under [project.entry-points.aic]
      README.md               install, test, use in a spec
      aic_NAME/__init__.py
      aic_NAME/plugin.py      a small working plugin of KIND, to change into yours
      tests/test_aic_NAME.py  aic's contract tests for KIND (aic_core.testing) and the entry-point check

The package is written from the files in aic_core/authoring/templates/ (package data): package/ holds the files
every kind shares (pyproject.toml, README.md, __init__.py), KIND/ the kind's own (plugin.py, plugin_tests.py and
use.md, the README's last section). The templates are Python that ruff checks and the tests import: their
placeholders are names that stand where the real ones go, `aic_NAME` (the import package), `aic-NAME` (the
distribution), `NAME` (the plugin's name), `KIND` and the class-name stem `Name` (`NameModel`, `NameOptions`).

They are working plugins, not stubs: model (a GPT from the core's blocks), positional (NoPE: adds no position
information), tokenizer (characters), adapter (a learned scale per output channel, like IA3), trainer (one
device, AdamW, exact resume).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from aic_core.errors import AicError, did_you_mean
from aic_core.plugins import KINDS

_NAME = re.compile(r"^[a-z][a-z0-9]*([-_][a-z0-9]+)*$")
RESERVED = {"core": "aic_core", "plugins": "aic_plugins"}  # import packages of aic itself


# What each placeholder of the templates becomes (see names_for); `Name` only where a capital follows (NameModel).
_PLACEHOLDER = re.compile(r"aic_NAME|aic-NAME|(?<![A-Za-z])(?:NAME|KIND)(?![A-Za-z])|Name(?=[A-Z])")


def names_for(name: str, kind: str = "") -> dict[str, str]:
    """The distribution, import package and class-name stem of a `kind` plugin called `name`: each placeholder of
    the templates and what it becomes."""
    return {
        "aic_NAME": "aic_" + name.replace("-", "_"),
        "aic-NAME": "aic-" + name.replace("_", "-"),
        "NAME": name,
        "KIND": kind,
        "Name": "".join(part.capitalize() for part in re.split(r"[-_]", name)),
    }


def template(kind: str, file: str) -> str:
    """The text of a template file: `kind` is a plugin kind, or "package" for the files every kind shares."""
    return (resources.files(__package__) / "templates" / kind / file).read_text(encoding="utf-8")


def package_files(kind: str, name: str) -> dict[str, str]:
    """{path in the package: text} of the package `new_plugin` writes, placeholders filled."""
    names = names_for(name, kind)
    pkg = names["aic_NAME"]
    files = {
        "pyproject.toml": template("package", "pyproject.toml"),
        "README.md": template("package", "README.md") + template(kind, "use.md"),
        f"{pkg}/__init__.py": template("package", "__init__.py"),
        f"{pkg}/plugin.py": template(kind, "plugin.py"),
        f"tests/test_{pkg}.py": template(kind, "plugin_tests.py"),
    }
    return {path: _PLACEHOLDER.sub(lambda m: names[m.group()], text) for path, text in files.items()}


def check_arguments(kind: str, name: str) -> None:
    """Refuse, with an aic error naming the argument, the value and the fix, what would not make a working package."""
    if kind not in KINDS:
        raise AicError(
            f"new-plugin KIND: unknown plugin kind {kind!r}{did_you_mean(kind, KINDS)}. "
            f"Choose one of: {', '.join(KINDS)}; for example `aic new-plugin positional my-positions`."
        )
    if not _NAME.match(name) or len(name) > 40:
        suggestion = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        suggestion = suggestion if _NAME.match(suggestion) else "my-plugin"
        raise AicError(
            f"new-plugin NAME: {name!r} is not a plugin name. Use at most 40 lower-case letters and digits, "
            f"starting with a letter, in parts joined by single '-' or '_' (e.g. {suggestion!r}); the package is "
            "named aic-NAME and imports as aic_NAME."
        )
    if name in RESERVED:
        raise AicError(
            f"new-plugin NAME: {name!r} would make the import package {RESERVED[name]}, which is aic's own and "
            "would shadow it. Choose another name."
        )


def new_plugin(kind: str, name: str, folder: Path | None = None) -> Path:
    """Write the package for a `kind` plugin called `name` into `folder` (default ./aic-NAME); return the folder."""
    check_arguments(kind, name)
    from aic_core.plugins.registry import get_registry

    existing = get_registry().plugins(kind).get(name)
    if existing is not None:
        source = get_registry().version_of(existing)
        raise AicError(
            f"new-plugin NAME: a {kind} plugin named {name!r} is already installed ({source}); two {kind} plugins "
            "cannot share a name (the one loaded first would win). Choose another name."
        )
    where = "--dir" if folder is not None else "new-plugin (the default folder ./aic-NAME)"
    folder = Path(folder) if folder is not None else Path.cwd() / names_for(name)["aic-NAME"]
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise AicError(
            f"{where}: {folder} already exists and is not an empty folder; nothing was written. "
            f"Pass another folder with --dir, or move that one away."
        )
    for relative, text in package_files(kind, name).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder
