"""Packaging guard: a wheel silently drops a subpackage missing from pyproject's package list."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_folder_is_in_the_wheel():
    packages, package_dir = _declared()
    found = set()
    for pkg, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == packages, f"missing from pyproject packages: {found - packages}; stale: {packages - found}"


def test_no_module_shadows_the_mapped_plugins_package():
    assert not (ROOT / "rwkv_zoo" / "plugins.py").exists()
    assert not (ROOT / "rwkv_zoo" / "backends.py").exists()


def test_default_plugins_are_importable_modules():
    import importlib

    from rwkv_zoo.pluginmanager import DEFAULT_PLUGINS

    for name in DEFAULT_PLUGINS:
        importlib.import_module(name)
