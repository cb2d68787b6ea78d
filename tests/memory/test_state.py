"""State helpers: `detach` cuts the graph without copying, `clone` copies differentiably."""

from __future__ import annotations

import pytest
import torch

import memory as mm


def test_detach_shares_storage_and_stops_gradients():
    base = torch.randn(3, 2, requires_grad=True)
    state = {"t.A": base * 2.0, "t.B": base + 1.0}
    out = mm.detach(state)
    assert list(out) == list(state)
    for key in state:
        assert not out[key].requires_grad
        assert out[key].data_ptr() == state[key].data_ptr()
        assert torch.equal(out[key], state[key])


def test_clone_copies_and_keeps_gradients_flowing():
    state = {"t.delta": torch.randn(2, 3, requires_grad=True)}
    out = mm.clone(state)
    assert out["t.delta"].data_ptr() != state["t.delta"].data_ptr()
    (out["t.delta"] * 3.0).sum().backward()
    torch.testing.assert_close(state["t.delta"].grad, torch.full((2, 3), 3.0))
    out["t.delta"].data.zero_()  # the copy is independent of the original
    assert state["t.delta"].abs().sum() > 0


@pytest.mark.parametrize("helper", [mm.detach, mm.clone])
def test_helpers_reject_non_states(helper):
    with pytest.raises(TypeError, match="mapping"):
        helper([torch.zeros(1)])
    with pytest.raises(TypeError, match=r"state\['x'\]"):
        helper({"x": 1.0})
