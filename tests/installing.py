"""Installing plugin packages into the test environment for a test, and removing them after it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest

AIC = [sys.executable, "-m", "aic_core.cli"]


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"],
        check=False,
        capture_output=True,
        text=True,
    )


@contextmanager
def installed(folders: list[Path], distributions: list[str]) -> Iterator[None]:
    """pip-install the package folders (no dependencies) and uninstall the distributions afterwards, whatever happens.

    Without build isolation when setuptools is importable here, so no network is needed; otherwise pip fetches
    the build backend."""
    for dist in distributions:
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            continue
        pytest.skip(
            f"{dist} is already installed in this environment; this test installs and removes it, so uninstall it first"
        )
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    try:
        done = pip("install", "--no-deps", *isolation, *(str(f) for f in folders))
        if done.returncode != 0:
            pytest.fail(f"pip install failed:\n{done.stdout}\n{done.stderr}")
        yield
    finally:
        pip("uninstall", "-y", *distributions)


def copy_package(src: Path, dest: Path) -> Path:
    """A clean copy of a package folder: building it writes build/ and *.egg-info next to its sources."""
    shutil.copytree(
        src, dest, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache", "runs")
    )
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: no plugin pinning or strict mode unless asked for."""
    env = {k: v for k, v in os.environ.items() if k not in ("AIC_PLUGINS", "AIC_STRICT_PLUGINS")}
    if "PYTHONPATH" in extra and env.get("PYTHONPATH"):  # add to the path this process was given, not replace it
        extra = {**extra, "PYTHONPATH": os.pathsep.join([extra["PYTHONPATH"], env["PYTHONPATH"]])}
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, cwd=cwd, env=clean_env(**env), timeout=timeout
    )
