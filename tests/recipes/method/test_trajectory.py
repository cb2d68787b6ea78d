"""The simulated trajectory: nested masks with the reference code's exact counts."""

from __future__ import annotations

import pytest
import torch

import diffusion as dd
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.method.trajectory import loss_masks, trajectory_masks


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_trajectory_masks_are_nested_with_exact_counts(steps):
    g = torch.Generator().manual_seed(4)
    maskable = torch.ones(64, 40, dtype=torch.bool)
    maskable[:, :7] = False
    t = torch.rand(64, generator=g)
    anchor = (torch.rand(64, 40, generator=g) < t[:, None]) & maskable
    cfg = MemDLMConfig(inner_steps=steps)
    masks = trajectory_masks(anchor, maskable, cfg, g)
    assert len(masks) == steps and masks[-1] is anchor
    # Exact integers: n_pre = min(n, max(m, floor(1.5 m))) (the reference code's float
    # int(n * 1.5 * m / n) is one short for some (n, m); see test_pre_anchor_count_...).
    expected_pre = torch.tensor(
        [
            min(n, max(m, 3 * m // 2))
            for m, n in zip(anchor.sum(1).tolist(), maskable.sum(1).tolist())
        ]
    )
    assert torch.equal(masks[0].sum(1), expected_pre)
    for noisier, cleaner in zip(masks, masks[1:]):
        assert not (cleaner & ~noisier).any()  # each state reveals, never re-masks
        assert not (noisier & ~maskable).any()
    if steps > 2:  # even reveals: ceil(remaining / steps left) positions at the first reveal
        extra = masks[0].sum(1) - anchor.sum(1)
        revealed = masks[0].sum(1) - masks[1].sum(1)
        assert torch.equal(revealed, torch.ceil(extra / (steps - 1)).long())


def test_strategies_and_loss_masks():
    g = torch.Generator().manual_seed(2)
    maskable = torch.ones(4, 30, dtype=torch.bool)
    anchor = torch.rand(4, 30, generator=g) < 0.3
    pre_only = trajectory_masks(anchor, maskable, MemDLMConfig(strategy="pre_only"), g)
    assert len(pre_only) == 1 and (pre_only[0] & anchor).sum() == anchor.sum()
    only = trajectory_masks(anchor, maskable, MemDLMConfig(strategy="anchor_only"), g)
    assert len(only) == 1 and only[0] is anchor
    inputs = trajectory_masks(anchor, maskable, MemDLMConfig(), g)
    student = loss_masks(inputs, anchor, "student_masked")
    assert student[0] is inputs[0] and student[1] is anchor
    newly = loss_masks(inputs, anchor, "newly_revealed")
    assert torch.equal(newly[0], inputs[0] & ~anchor) and torch.equal(newly[1], anchor)


def test_pre_anchor_count_is_exact_integer_arithmetic():
    """min(n, max(m, floor(1.5 m))) for every (n, m) with n <= 4096 (issue: the float form was one
    token short for 4.7% of them)."""
    from recipes.memdlm.method.trajectory import pre_anchor_count

    n = torch.arange(1, 4097).repeat_interleave(torch.arange(1, 4097) + 1)
    m = torch.cat([torch.arange(k + 1) for k in range(1, 4097)])
    want = torch.minimum(n, torch.maximum(m, (3 * m) // 2))
    torch.testing.assert_close(pre_anchor_count(m, n, 1.5), want, rtol=0, atol=0)
    float_form = torch.floor(n.double() * (1.5 * m.double() / n.double())).long()
    assert (torch.minimum(n, torch.maximum(m, float_form)) != want).any()  # the bug it fixes
    for s_pre, m_, expected in ((2.0, 7, 14), (1.25, 9, 11), (1.0, 5, 5)):
        got = pre_anchor_count(torch.tensor([m_]), torch.tensor([100]), s_pre)
        assert int(got) == expected


def test_pre_anchor_state_has_the_exact_count_and_contains_the_anchor():
    g = torch.Generator().manual_seed(0)
    maskable = torch.rand(64, 50, generator=g) < 0.8
    t = torch.rand(64, generator=g)
    _, anchor = dd.corrupt(
        torch.zeros(64, 50, dtype=torch.long),
        t,
        mask_id=1,
        schedule=dd.LinearSchedule(),
        maskable=maskable,
        generator=g,
    )
    pre = trajectory_masks(anchor, maskable, MemDLMConfig(s_pre=1.5), g)[0]
    m, n = anchor.sum(1), maskable.sum(1)
    assert torch.equal(pre.sum(1), torch.minimum(n, torch.maximum(m, (3 * m) // 2)))
    assert not (anchor & ~pre).any() and not (pre & ~maskable).any()
