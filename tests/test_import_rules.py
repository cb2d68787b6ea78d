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
