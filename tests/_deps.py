"""Dependencies that CI provides: missing on a developer's machine, a test skips; missing under CI, it fails.

A bare ``pytest.importorskip`` turns a broken install step into dozens of quiet skips and a green run
(issue 21). Every test that needs a package from the ``test`` extra, the example plugin, the C++
compiler or nvcc asks through here instead, so the rule lives in one place. CI sets ``CI=true``;
tests/conftest.py also fails a CI run whose skips are not all GPU or benchmark skips.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")

TEST_EXTRA = "pip install -e '.[test]' in .ci/run"
EXAMPLE_PLUGIN = "pip install -e examples/third_party_backend in .ci/run"
CORE = "pip install -e . in .ci/run (a dependency of rwkv-zoo itself)"
CXX = "the CI machine's g++ (the CPU kernels have a portable build for any CPU)"
NVCC = "the CI machine's CUDA toolkit (nvcc and its headers)"


def missing(what: str, install: str) -> NoReturn:
    """Skip, or under CI fail, naming what is missing and the step that should have provided it."""
    message = f"{what} (provided by: {install})"
    if CI:
        pytest.fail(f"CI=true and a CI dependency is missing: {message}", pytrace=False)
    pytest.skip(message)


def require(module: str, install: str = TEST_EXTRA) -> ModuleType:
    """``importorskip`` for packages CI installs. Only ImportError counts as missing: a package that
    is installed but broken fails wherever it is used."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f"Python package {module!r} is not importable ({exc})"
    missing(why, install)  # outside the except block: the message, not a chained traceback


def require_tool(*names: str, install: str) -> str:
    """The path of the first of ``names`` on PATH."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    missing(f"{' or '.join(names)} is not on PATH", install)


def needs(reason: str | None, install: str) -> pytest.MarkDecorator:
    """A ``skipif`` for CI-provided things: ``reason`` says what is missing, None when nothing is.
    tests/conftest.py applies it (``missing`` before the test runs)."""
    return pytest.mark.ci_dependency(reason, install)


def block_versions() -> list[str]:
    """Every registered version with blocks of its own and a ``tiny`` preset: what the suite parametrises
    over, so a version added to the zoo is tested without editing a list here."""
    import rwkv_zoo
    from rwkv_zoo.registry import get_version

    out = []
    for name in rwkv_zoo.list_versions():
        spec = get_version(name)
        if spec.block_cls is not None and any(p.name == "tiny" for p in spec.sizes):
            out.append(name)
    return out
