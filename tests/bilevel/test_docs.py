"""The code blocks of docs/bilevel.md run as written and show what the text says they show."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "bilevel.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def _run(source: str) -> dict:
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(source, str(DOC), "exec"), namespace)
    return namespace


def test_the_page_has_the_quick_example_the_bridge_and_two_worked_examples():
    blocks = _python_blocks()
    assert len(blocks) == 4
    assert len(blocks[0].strip().splitlines()) <= 10  # the README quick example


def test_quick_example_gives_the_closed_form_hypergradient():
    """w*(theta) = theta A^-1 b, F = ||w* - 1||^2: dF/dtheta = 2 (w* - 1)^T A^-1 b = 1.4."""
    ns = _run(_python_blocks()[0])
    torch.testing.assert_close(ns["theta"].grad, torch.tensor(1.4), rtol=1e-5, atol=1e-6)


def test_implicit_root_at_a_given_solution_gives_the_closed_form_hypergradient():
    """The same problem as the quick example, solved without a graph (evaluation only), then
    differentiated at that solution through implicit_root and the grad_w f bridge."""
    ns = _run(_python_blocks()[1])
    assert not ns["w_star"]["w"].requires_grad
    torch.testing.assert_close(ns["theta"].grad, torch.tensor(1.4), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_maml_example_learns_an_initialisation_that_adapts():
    ns = _run(_python_blocks()[2])
    assert ns["after"] < 0.7 * ns["baseline"]


@pytest.mark.slow
def test_ridge_example_lowers_the_validation_loss_and_penalises_noise_features():
    ns = _run(_python_blocks()[3])
    assert ns["val_losses"][-1] < 0.2 * ns["val_losses"][0]
    penalties = ns["log_lam"].detach().exp()
    assert penalties[3:].min() > penalties[:3].max()
