"""The import structure of the installed package (DESIGN.md §0: dependencies point down, no import cycles,
library code never imports the CLI), read with ``ast`` so nothing is imported to check it.

Every module under ``rwkv_zoo``, ``rwkv_zoo.backends`` and ``rwkv_zoo.plugins`` is parsed; its imports of
rwkv_zoo modules are collected at module level and inside functions. Imports under ``if TYPE_CHECKING:``
never run and are left out. An import of a package's own submodule (``from rwkv_zoo import dispatch``)
counts as an import of the submodule; the implicit import of parent packages does not count.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOTS = ("rwkv_zoo", "rwkv_zoo.backends", "rwkv_zoo.plugins")
CLI = "rwkv_zoo.cli"

# Function-local imports that close an import cycle, as (importer, imported). They run only when the
# function does, so they work, but each is a dependency pointing up that DESIGN.md §0 rules out. The
# modules involved are being rewritten elsewhere; remove an entry when its cycle is gone (the test says
# so), and never add one for new code.
KNOWN_LOCAL_CYCLES: frozenset[tuple[str, str]] = frozenset()  # none left: keep it that way


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    local: bool  # inside a function (runs when the function does)
    line: int


def _modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the installed package."""
    found: dict[str, Path] = {}
    for root in ROOTS:
        spec = importlib.util.find_spec(root)
        assert spec is not None and spec.submodule_search_locations, root
        for base in map(Path, spec.submodule_search_locations):
            for path in sorted(base.rglob("*.py")):
                parts = path.relative_to(base).with_suffix("").parts
                if not all((base.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
                    continue  # a folder that is not a package (scripts, data)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found.setdefault(".".join((root, *parts)), path)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _ours(name: str) -> bool:
    return name == "rwkv_zoo" or name.startswith("rwkv_zoo.")


def _existing(name: str, modules: dict[str, Path]) -> str:
    """The module an import loads: the name itself, or the nearest package above a missing name."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, local: bool, line: int) -> None:
        if _ours(target):
            target = _existing(target, modules)
            if target != name:
                found.append(Import(name, target, local, line))

    def walk(node: ast.AST, local: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, local, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, local, node.lineno)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                walk(child, local)
            return
        local = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            walk(child, local)

    walk(tree, False)
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    modules = _modules()
    assert {"rwkv_zoo", "rwkv_zoo.cli", "rwkv_zoo.bench", "rwkv_zoo.backends.reference"} <= set(modules)
    return [imp for name, path in sorted(modules.items()) for imp in _imports(name, path, modules)]


def _graph(edges) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [m0, m1, ..., m0], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _path(graph: dict[str, set[str]], src: str, dst: str) -> list[str] | None:
    """A shortest import path src -> ... -> dst (breadth first)."""
    prev: dict[str, str | None] = {src: None}
    queue = [src]
    for node in queue:
        if node == dst:
            out = [node]
            while prev[out[-1]] is not None:
                out.append(prev[out[-1]])
            return out[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return None


def test_library_never_imports_the_cli(imports):
    def is_cli(name: str) -> bool:
        return name == CLI or name.startswith(CLI + ".")

    bad = [f"{i.importer} line {i.line}{' (in a function)' if i.local else ''} imports {i.target}"
           for i in imports if is_cli(i.target) and not is_cli(i.importer) and not i.importer.endswith(".__main__")]
    assert not bad, "library code imports the CLI:\n" + "\n".join(bad)


def test_module_level_imports_have_no_cycle(imports):
    cycle = _find_cycle(_graph((i.importer, i.target) for i in imports if not i.local))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_function_local_import_cycles_are_the_known_ones(imports):
    graph = _graph((i.importer, i.target) for i in imports)
    # An edge a -> b lies on a cycle exactly when b leads back to a.
    closing = {(i.importer, i.target) for i in imports if i.local and _path(graph, i.target, i.importer)}
    new = sorted(closing - KNOWN_LOCAL_CYCLES)
    gone = sorted(KNOWN_LOCAL_CYCLES - closing)
    lines = [f"new: {' -> '.join([a, *(_path(graph, b, a) or [])])} (the local import {a} -> {b})" for a, b in new]
    lines += [f"fixed, remove from KNOWN_LOCAL_CYCLES: {a} -> {b}" for a, b in gone]
    assert not lines, "function-local import cycles changed:\n" + "\n".join(lines)
