"""DESIGN rule 1: the three libraries import only torch, numpy, triton and the standard
library, never each other and never `recipes`. Checked by parsing every import statement."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("bilevel", "diffusion", "memory")
ALLOWED_THIRD_PARTY = {"torch", "numpy", "triton"}


def imported_roots(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, top-level module) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("library", LIBRARIES)
def test_library_imports_only_allowed_modules(library):
    files = sorted((ROOT / library).rglob("*.py"))
    assert files, f"{library}/ has no Python files"
    allowed = set(sys.stdlib_module_names) | ALLOWED_THIRD_PARTY | {library, "__future__"}
    violations = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in imported_roots(path)
        if module not in allowed
    ]
    assert not violations, "one-way import rule broken:\n" + "\n".join(violations)


def test_checker_catches_a_cross_import(tmp_path):
    """The checker itself must fail on a forbidden import (a check that cannot fail is no check)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom memory import FastLoRA\nimport recipes.memdlm\n")
    roots = [module for _, module in imported_roots(bad)]
    assert roots == ["os", "memory", "recipes"]


# --------------------------------------------------------------------------- the import graph

PACKAGES = ("bilevel", "diffusion", "memory", "recipes")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(node: ast.ImportFrom, path: pathlib.Path) -> str:
    """The absolute module of a `from ... import` (relative ones resolved against `path`)."""
    if node.level == 0:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def first_party_imports(path: pathlib.Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every first-party import in a file, at any depth (a lazy
    import inside a function is an edge too: it closes a circle as soon as it runs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, path)
            names = [alias.name for alias in node.names]
            found.append((module, names))
            # `from pkg import sub` imports the submodule pkg.sub
            found += [(f"{module}.{n}", []) for n in names if f"{module}.{n}" in known]
    return [(m, names) for m, names in found if m.split(".")[0] in PACKAGES and m in known]


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    known = {module_name(p) for p in files}
    graph = {}
    for path in files:
        me = module_name(path)
        # a package's own __init__ re-exporting its submodules is not a circle
        graph[me] = {
            m for m, _ in first_party_imports(path, known) if m != me and not me.startswith(m + ".")
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_anywhere():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def unit_graph(graph: dict[str, set[str]], prefix: str = "recipes.memdlm.") -> dict:
    """The module graph folded to the recipe's units: its subpackages and top-level modules."""
    units: dict[str, set[str]] = {}

    def unit(module: str) -> str | None:
        return module[len(prefix) :].split(".")[0] if module.startswith(prefix) else None

    for module, imports in graph.items():
        if (me := unit(module)) is not None:
            units.setdefault(me, set()).update(
                u for m in imports if (u := unit(m)) is not None and u != me
            )
    return units


def test_no_import_circle_between_the_recipes_subpackages():
    """backbones/, data/, loop/, method/, eval/, commands/ and the top-level modules: the
    model's construction and checkpoint loading sit in build.py, above all of them."""
    cycle = find_cycle(unit_graph(import_graph()))
    assert cycle is None, "subpackage circle: " + " -> ".join(cycle)
    folded = unit_graph(
        {"recipes.memdlm.a.x": {"recipes.memdlm.b.y"}, "recipes.memdlm.b.z": {"recipes.memdlm.a.w"}}
    )
    assert find_cycle(folded) == ["a", "b", "a"]


def test_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_names():
    files = [p for pkg in PACKAGES + ("tests", "benchmarks") for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    offences = [
        f"{path.relative_to(ROOT)} imports {name} from {module}"
        for path in files
        for module, names in first_party_imports(path, known | {m.rsplit(".", 1)[0] for m in known})
        for name in names
        # no exception, not even a library's own modules: a name another module uses is public
        # in its module (docs/memdlm.md, "Where things are")
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not offences, "\n".join(offences)
