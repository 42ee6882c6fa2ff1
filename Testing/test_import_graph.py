"""No import circles among our modules, counting every import (at the top or inside a function).

An import moved into a function to start faster still says "this module needs that one":
a circle through such imports is the same tangle, only hidden until a call runs it. Data
flows one way (imaging -> engine -> session -> front ends), and this graph says whether the
code does too. Imports under ``if TYPE_CHECKING:`` are type hints only and are not counted.
"""

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = (PROJECT / "RadFMSlicer", PROJECT / "RadFMModule" / "RadFMModuleLib")


def module_files(packages) -> dict[str, Path]:
    """Dotted name -> file, for every module of ``packages`` (their folders)."""
    files = {}
    for package in packages:
        for path in package.rglob("*.py"):
            parts = path.relative_to(package.parent).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, wherever it sits, except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            yield from (n for child in node.orelse for n in _import_nodes(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that importing or running ``name`` imports, with each target's enclosing packages
    (``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first), except those enclosing ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([node.module] if node.module else []))
        for alias in node.names:  # `from pkg import module` imports the module; `from module import name` the module
            targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}
    found = set()
    for target in targets:
        parts = target.split(".")
        found.update(m for m in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if m in modules)
    return found - own


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_files(packages)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a path back to its start) per strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_around(graph, group) for group in groups]


def _path_around(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]] & group):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return sorted(group)


def test_no_module_imports_itself_back_round_a_circle():
    graph = import_graph()
    assert "RadFMSlicer.worker.client" in graph and "RadFMModuleLib.chat_panel" in graph  # it sees our packages
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def _graph_of(tmp_path, files: dict[str, str]) -> dict[str, set[str]]:
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return import_graph([tmp_path / "pkg"])


@pytest.mark.parametrize("where", ["top", "function", "package"])
def test_the_check_sees_a_circle_through_a_top_level_a_function_or_a_package_import(tmp_path, where):
    b_imports = {"top": "from . import a\n", "function": "def f():\n    from .a import x\n",
                 "package": "from .sub.c import y\n"}[where]
    graph = _graph_of(tmp_path, {
        "pkg/__init__.py": "", "pkg/a.py": "from .b import z\nx = 1\n", "pkg/b.py": b_imports + "z = 1\n",
        "pkg/sub/__init__.py": "from ..a import x\n", "pkg/sub/c.py": "y = 1\n",
        "pkg/hints.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n",
    })
    found = circles(graph)
    assert found and found[0][0] == found[0][-1] == "pkg.a", found
    assert "pkg.a" not in graph["pkg.hints"]  # a type hint is not an import at run time
