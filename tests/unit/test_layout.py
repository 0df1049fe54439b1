"""
The shape of the code stays what docs/architecture.rst says: every module
says what it is for, no class outside ``llmproxy/testing`` grows past about
200 lines nor any function past about 60, and the modules import each other
without a cycle (so they stand in layers, each using only those below it).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parents[2] / "llmproxy"
MAX_CLASS = 200
MAX_FUNCTION = 60


def modules() -> Iterator[tuple[str, ast.Module]]:
    """(dotted name, parsed source) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(), str(path))


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (anywhere in it)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from llmproxy import errors`` names a module; ``from x import y`` a name of x.
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "llmproxy":
                found.add(target)
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, if it has any."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


class LayoutTests(SynchronousTestCase):
    def test_every_module_says_what_it_is_for(self) -> None:
        silent = [name for name, tree in modules() if not ast.get_docstring(tree)]
        assert silent == [], f"modules without a docstring: {silent}"

    def test_no_room_is_too_long(self) -> None:
        long = []
        for name, tree in modules():
            if name.startswith("llmproxy.testing"):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    size = (node.end_lineno or node.lineno) - node.lineno + 1
                    limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
                    if size > limit:
                        long.append(f"{name}.{node.name}: {size} lines (limit {limit})")
        assert long == [], "split these: " + "; ".join(long)

    def test_the_import_graph_has_no_cycle(self) -> None:
        parsed = dict(modules())
        known = set(parsed)
        graph = {name: imports(name, tree, known) for name, tree in parsed.items()}
        assert graph["llmproxy.pipeline"], "the import reader found nothing: fix the test"
        assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph) or [])}"

    def test_the_cycle_finder_finds_cycles(self) -> None:
        assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
        assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
