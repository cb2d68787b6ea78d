"""chain, scale and apply_updates: composition semantics and boundary errors."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def _tree():
    return {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}


def test_chain_applies_transforms_left_to_right():
    grads, params = _tree(), _tree()
    clip, step = bl.clip_per_tensor(0.5), bl.sgd(0.1, momentum=0.9)
    chained = bl.chain(clip, step)
    state = chained.init(params)
    for _ in range(3):
        expected_clip, _ = clip.update(grads, (), params)
        expected, _ = step.update(expected_clip, state[1], params)
        updates, state = chained.update(grads, state, params)
        for k in grads:
            torch.testing.assert_close(updates[k], expected[k], rtol=0, atol=0)
    # the momentum buffer lives in the chain's state and equals the sum of clipped grads * 0.9^j
    clipped, _ = clip.update(grads, (), params)
    torch.testing.assert_close(state[1].momentum["w"], clipped["w"] * (1 + 0.9 + 0.81))


def test_chain_rejects_non_transformations_and_foreign_state():
    with pytest.raises(TypeError, match="chain argument 1 must be a GradientTransformation"):
        bl.chain(bl.sgd(0.1), "adam")
    chained = bl.chain(bl.scale(2.0), bl.sgd(0.1))
    with bl.debug_checks(), pytest.raises(ValueError, match="chain of 2 transforms"):
        chained.update(_tree(), (), None)  # the state's arity: checked when debugging


def test_scale_with_a_tensor_factor_is_differentiable():
    factor = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    grads = _tree()
    updates, _ = bl.scale(factor).update(grads, (), None)
    total = sum(u.sum() for u in updates.values())
    (d_factor,) = torch.autograd.grad(total, factor)
    torch.testing.assert_close(d_factor, sum(g.sum() for g in grads.values()))


def test_apply_updates_adds_and_checks_keys_and_shapes():
    params, updates = _tree(), _tree()
    new = bl.apply_updates(params, updates)
    for k in params:
        torch.testing.assert_close(new[k], params[k] + updates[k])
    assert new is not params
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        bl.apply_updates(params, {"w": updates["w"]})
    with pytest.raises(ValueError, match=r"updates\['b'\] has shape \(3,\)"):
        bl.apply_updates(params, {"w": updates["w"], "b": torch.zeros(3)})
    with pytest.raises(TypeError, match=r"params must be a dict\[str, Tensor\]"):
        bl.apply_updates([params["w"]], updates)
    with pytest.raises(TypeError, match=r"updates\['w'\] must be a Tensor"):
        bl.apply_updates(params, {"w": 1.0, "b": updates["b"]})
    with pytest.raises(ValueError, match="empty dict"):
        bl.apply_updates({}, {})
