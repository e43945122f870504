"""PLUGINS.md and the hookspecs do not drift apart: every hook is documented with its exact signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from rwkv_zoo import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "PLUGINS.md").read_text()
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("rwkv_zoo_"))


def _call_form(fn) -> str:
    """``rwkv_zoo_select_backend(call, candidates)``."""
    return f"{fn.__name__}({', '.join(inspect.signature(fn).parameters)})"


def _typed_form(fn) -> str:
    """``def rwkv_zoo_select_backend(call: KernelCall, candidates: list[str]) -> Choice | str | None``."""
    sig = inspect.signature(fn)  # annotations are strings (from __future__ import annotations)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {fn.__name__}({params}) -> {sig.return_annotation}"


def test_there_are_hooks_to_document():
    assert len(HOOKS) == 7


@pytest.mark.parametrize("name", HOOKS)
def test_hook_and_its_exact_signature_are_documented(name):
    fn = getattr(hookspecs, name)
    assert f"`{_call_form(fn)}`" in DOC, f"PLUGINS.md must document `{_call_form(fn)}`"
    assert _typed_form(fn) in DOC, f"PLUGINS.md must give the exact signature: {_typed_form(fn)}"


def test_documented_hooks_all_exist():
    documented = set(re.findall(r"\b(rwkv_zoo_[a-z_]+)\(", DOC)) - {"rwkv_zoo_plugin"}  # the pytest fixture
    assert documented == set(HOOKS), f"unknown hooks in PLUGINS.md: {documented - set(HOOKS)}"


def test_firstresult_hooks_are_marked():
    for name in HOOKS:
        opts = getattr(hookspecs, name).rwkv_zoo_spec  # pluggy stores the spec options on the function
        row = next(line for line in DOC.splitlines() if line.startswith(f"| `{name}("))
        assert ("**yes**" in row) == bool(opts.get("firstresult")), row


def test_environment_variables_and_commands_are_documented():
    for needle in ("RWKV_ZOO_DISABLE_PLUGINS", "RWKV_ZOO_NO_AUTOLOAD", "RWKV_ZOO_BACKEND", "--rwkv-zoo-backend",
                   "[project.entry-points.rwkv_zoo]", "registered_plugin", "rwkv_zoo_plugin", "rwkv-zoo plugins"):
        assert needle in DOC, needle
