"""The simulated trajectory: nested masks with the reference code's exact counts."""

from __future__ import annotations

import pytest
import torch

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
    # The reference code's arithmetic in Python doubles: r = m / n, n_pre = int(n * r_pre).
    expected_pre = []
    for m, n in zip(anchor.sum(1).tolist(), maskable.sum(1).tolist()):
        r = m / n
        expected_pre.append(min(n, max(m, int(n * min(1.0, max(1.5 * r, r))))))
    expected_pre = torch.tensor(expected_pre)
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
