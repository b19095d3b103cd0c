"""The package layout: no import cycles between modules, no private names imported across modules, no docstring
pointing at files outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import oodguard

PACKAGE = Path(oodguard.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of the package imported at module level (imports inside functions are deliberate and lazy)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # TYPE_CHECKING blocks are not executed
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oodguard"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("oodguard"))
    return found & known


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_between_modules():
    trees = modules()
    known = set(trees)

    # Edges between a package and its own submodules are how packages expose them (the __init__ imports them,
    # and importing a submodule runs its package first): not cycles between modules.
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    graph = {name: {m for m in imported_modules(tree, known) if not related(name, m)} for name, tree in trees.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_private_names_imported_from_other_modules():
    offenders = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oodguard"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{name} imports {alias.name} from {node.module}")
    assert not offenders, "\n".join(offenders)


def test_docstrings_cite_papers_and_code_not_notes_outside_the_repository():
    pattern = re.compile(r"\bspec(ification)? section|\bthe spec\b|method notes|shared/methods", re.IGNORECASE)
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not offenders, "references to notes outside the repository: " + ", ".join(offenders)
