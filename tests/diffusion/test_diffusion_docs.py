"""docs/diffusion.md: every ```python block runs as written, in order, in one namespace, and the
quick example at the top stays within ten lines."""

from __future__ import annotations

import pathlib
import re

import torch

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "diffusion.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_quick_example_is_at_most_ten_lines():
    first = _python_blocks()[0]
    assert len(first.strip().splitlines()) <= 10


def test_documentation_examples_run():
    blocks = _python_blocks()
    assert len(blocks) >= 5
    namespace: dict = {}
    torch.manual_seed(0)
    for index, block in enumerate(blocks):
        code = compile(block, f"{DOC.name}[python block {index}]", "exec")
        exec(code, namespace)
