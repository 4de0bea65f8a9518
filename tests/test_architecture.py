"""The package's shape, checked: no import circles, the layers of DESIGN.md, one idea per module.

The import graph is read from the source (every ``import`` statement, also inside functions and
under ``TYPE_CHECKING``), with each package's ``__init__`` as a module of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dynlens

ROOT = Path(dynlens.__file__).parent
#: One idea per module (DESIGN.md): a module past this many lines holds more than one.
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(name: str) -> set[str]:
    """The dynlens modules ``name`` imports (a name that is a submodule counts as the module)."""
    path = MODULES[name]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = resolve(name, path.name == "__init__.py", node)
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                for alias in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports_of(name) for name in MODULES}
#: The package's front door and what it runs: they use the callbacks by design.
FRONT = {"dynlens", "dynlens.demo", "dynlens.cli", "dynlens.__main__"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_and_the_graph_is_read():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "dynlens.callbacks.base" in GRAPH["dynlens.callbacks.collapse"]
    assert "dynlens.events" in GRAPH["dynlens.report.families.warning"]


def test_no_import_circles():
    assert cycles(GRAPH) == []


def reaches(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize(
    "layer", sorted(m for m in MODULES if not m.startswith("dynlens.callbacks") and m not in FRONT)
)
def test_the_pure_layer_and_the_report_never_reach_the_callbacks(layer):
    assert not {m for m in reaches(layer) if m.startswith("dynlens.callbacks")}


def test_nothing_below_the_callbacks_imports_lightning():
    # the Lightning glue: the callbacks, the dual-package base classes and the datamodules
    glue = ("dynlens.callbacks", "dynlens.compat", "dynlens.data")
    below = [name for name in MODULES if not name.startswith(glue) and name not in FRONT]
    assert "dynlens.curvature.operator" in below
    for name in below:
        tree = ast.parse(MODULES[name].read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("lightning", "pytorch_lightning")}, (
            name
        )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_one_idea_per_module(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by idea"
