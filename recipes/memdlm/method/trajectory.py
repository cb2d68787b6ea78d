"""MemDLM's simulated denoising trajectory: the nested masks of the inner steps.

From the anchor mask M_t, the "progressive memory consistent" (pmc) strategy builds a noisier
pre-anchor state whose mask is a superset of M_t, optionally evenly spaced intermediate states,
and ends at the anchor itself; each state is reached from the previous one by revealing tokens,
never by re-masking (memdlm-method.md section 2.2).
"""

from __future__ import annotations

import torch

import diffusion as dd
from recipes.memdlm.config import MemDLMConfig


def realised_ratio(mask: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Realised mask ratio per row, in float64 so floor(n * s_pre * r) matches exact arithmetic."""
    return mask.sum(1).double() / maskable.sum(1).clamp(min=1).double()


def _nested_exact(mask, count, within, generator) -> torch.Tensor:
    """A superset of `mask` inside `within` with exactly `count` (B,) masked positions per row."""
    n_within = within.sum(1).clamp(min=1)
    # nested_mask takes floor(n * ratio); the half-token offset makes the floor land on `count`.
    ratio = (count.to(torch.float64) + 0.5) / n_within
    return dd.nested_mask(mask, ratio, maskable=within, generator=generator)


def trajectory_masks(
    anchor_mask: torch.Tensor,
    maskable: torch.Tensor,
    cfg: MemDLMConfig,
    generator,
) -> list[torch.Tensor]:
    """Input masks of the inner steps, noisiest first, each a superset of the next.

    pmc: pre-anchor (ratio min(1, max(s_pre r, r)), exact count floor(n r_pre)), then for K > 2
    evenly spaced reveals of ceil(remaining / steps_left) positions, then the anchor itself
    (K = 1 is the anchor alone). pre_only: the pre-anchor state alone; anchor_only: the anchor.
    """
    if cfg.strategy == "anchor_only" or (cfg.strategy == "pmc" and cfg.inner_steps == 1):
        return [anchor_mask]
    r = realised_ratio(anchor_mask, maskable)
    r_pre = torch.clamp(torch.maximum(cfg.s_pre * r, r), max=1.0)
    pre = dd.nested_mask(anchor_mask, r_pre, maskable=maskable, generator=generator)
    if cfg.strategy == "pre_only":
        return [pre]
    masks = [pre]
    n_anchor = anchor_mask.sum(1)
    for steps_left in range(cfg.inner_steps - 1, 1, -1):
        current = masks[-1]
        reveal = torch.ceil((current.sum(1) - n_anchor) / steps_left).long()
        masks.append(_nested_exact(anchor_mask, current.sum(1) - reveal, current, generator))
    return [*masks, anchor_mask]


def loss_masks(inputs: list[torch.Tensor], anchor_mask, mode: str) -> list[torch.Tensor]:
    """What each inner step predicts: every masked input position ("student_masked", the code's
    default), or only those revealed by the next state ("newly_revealed", paper Eq. 7)."""
    if mode == "student_masked":
        return inputs
    nexts = [*inputs[1:], torch.zeros_like(anchor_mask)]
    return [current & ~following for current, following in zip(inputs, nexts)]
