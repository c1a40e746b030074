"""Data flows one way: frontends -> ir <- passes; backends read ir.

Walks every module's imports (module- and function-level) with ``ast`` and fails on a wrong-way
edge, naming file:line. Top-level modules (pipeline, cli, demo, zoo, bench/, tools/) may import
anything. Also: no module outside ``ir/`` reaches into ``Graph``'s private attributes.
"""
from __future__ import annotations

import ast
from pathlib import Path

import graphopt
from graphopt.ir import Graph

ROOT = Path(graphopt.__file__).parent

# package -> packages of ours it must not import
FORBIDDEN = {
    "ir": None,  # None: nothing of ours outside ir
    "passes": {"backends", "frontends"},
    "backends": {"passes"},
    "frontends": {"backends", "passes"},
}


def _modules(under: str | None = None):
    base = ROOT / under if under else ROOT
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build", "dist") or rel.parts[0].startswith(".") or "__pycache__" in rel.parts:
            continue  # the project's sources only, not build copies, virtual environments or caches
        yield rel, ast.parse(path.read_text(), filename=str(path))


def _imported(rel: Path, tree: ast.AST):
    """(line, dotted module name) of every import of ours, relative imports resolved."""
    package = ["graphopt", *rel.parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "graphopt":  # from graphopt import x: x is the module imported
                for alias in node.names:
                    yield node.lineno, f"graphopt.{alias.name}"
            else:
                yield node.lineno, name


def wrong_way_imports() -> list[str]:
    problems = []
    for layer, forbidden in FORBIDDEN.items():
        for rel, tree in _modules(layer):
            for line, name in _imported(rel, tree):
                parts = name.split(".")
                if parts[0] != "graphopt" or len(parts) < 2:
                    continue
                target = parts[1]
                if target == layer:
                    continue
                if forbidden is None or target in forbidden:
                    problems.append(f"{rel}:{line}: {layer} imports {name}")
    return problems


def graph_privates() -> set[str]:
    g = Graph()
    names = set(vars(g)) | {n for n in vars(Graph)}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_graph_accesses() -> list[str]:
    """``x._tail`` and friends outside ir/ (``self._x`` is the accessing class's own attribute)."""
    privates = graph_privates()
    problems = []
    for rel, tree in _modules():
        if rel.parts[0] == "ir":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in privates \
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                problems.append(f"{rel}:{node.lineno}: .{node.attr}")
    return problems


def test_no_wrong_way_import():
    problems = wrong_way_imports()
    assert not problems, "wrong-way imports:\n" + "\n".join(problems)


def test_no_module_outside_ir_touches_graph_privates():
    problems = private_graph_accesses()
    assert not problems, "Graph privates used outside ir/ (use the public Graph API):\n" + "\n".join(problems)


def test_the_checks_see_a_wrong_way_edge_and_a_private_access():
    """The walkers find what they look for (so an empty list above means something)."""
    tree = ast.parse("def f():\n    from graphopt.backends import x\n    from ..frontends import y\n    return g._tail\n")
    edges = list(_imported(Path("passes/p.py"), tree))
    assert edges == [(2, "graphopt.backends"), (3, "graphopt.frontends")]
    assert {"_tail", "_head", "_names"} <= graph_privates()
