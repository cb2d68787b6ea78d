"""The README tells the truth: its Python examples run, its commands parse and validate."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from recipes.memdlm.cli import build_parser
from recipes.memdlm.commands.folders import config_from_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_has_the_two_commands_ci_runs():
    lines = blocks("bash")[0].splitlines()
    install = lines[lines.index(next(l for l in lines if l.startswith("# 1."))) + 1]
    test = lines[lines.index("# 2. run the tests") + 1]
    assert "pip install torch==2.13.0" in install and install.endswith("python -m recipes.memdlm")
    assert install.index("torch==2.13.0") < install.index('-e ".[dev]"')
    assert test.endswith("python -m pytest") and "OMP_NUM_THREADS=" in test
    assert "grep -A1 '^# 2\\. run the tests' README.md" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.splitlines()[1][:30])
def test_python_examples_run(code):
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def recipe_commands() -> list[str]:
    return [
        line.split("  #")[0].strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.startswith("python -m recipes.memdlm")
    ]


@pytest.mark.parametrize("command", recipe_commands())
def test_recipe_commands_parse_and_validate(command):
    argv = shlex.split(command)[3:]
    if "--help" in argv:
        return  # exercised by tests/recipes/test_cli.py
    args, extra = build_parser().parse_known_args(argv)
    assert args.command in {"compare", "train", "eval", "sample", "inner-lr"}
    if args.command in {"compare", "train", "inner-lr"}:
        config_from_args(args, extra)  # every override names a real key with a valid value
    else:
        assert not extra, f"unknown options {extra}"
