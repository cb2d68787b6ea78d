"""MemDLM's simulated denoising trajectory: the nested masks of the inner steps.

From the anchor mask M_t, the "progressive memory consistent" (pmc) strategy builds a noisier
pre-anchor state whose mask is a superset of M_t, optionally evenly spaced intermediate states,
and ends at the anchor itself; each state is reached from the previous one by revealing tokens,
never by re-masking (memdlm-method.md section 2.2).
"""

from __future__ import annotations

from fractions import Fraction

import torch

import diffusion as dd
from recipes.memdlm.config import MemDLMConfig


def realised_ratio(mask: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Realised mask ratio per row (float64): the inner loss's 1/r weight."""
    return mask.sum(1).double() / maskable.sum(1).clamp(min=1).double()


def pre_anchor_count(n_anchor: torch.Tensor, n_maskable: torch.Tensor, s_pre: float):
    """Masked positions of the pre-anchor state, min(n, max(m, floor(s_pre * m))), per row.

    n_anchor (B,) long: m, the anchor's masked count; n_maskable (B,) long: n. Computed in
    integers with s_pre as the decimal fraction it is written as (1.5 -> 3/2): the float form
    floor(n * float(s_pre * m / n)) is one token short for some (n, m), e.g. 4.7% of the pairs
    with n <= 4096 at s_pre = 1.5.
    """
    ratio = Fraction(str(s_pre)).limit_denominator(10**6)
    scaled = torch.div(n_anchor * ratio.numerator, ratio.denominator, rounding_mode="floor")
    return torch.minimum(n_maskable, torch.maximum(n_anchor, scaled))


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

    pmc: pre-anchor (exact count min(n, max(m, floor(s_pre m))), `pre_anchor_count`), then for K > 2
    evenly spaced reveals of ceil(remaining / steps_left) positions, then the anchor itself
    (K = 1 is the anchor alone). pre_only: the pre-anchor state alone; anchor_only: the anchor.
    """
    if cfg.strategy == "anchor_only" or (cfg.strategy == "pmc" and cfg.inner_steps == 1):
        return [anchor_mask]
    count = pre_anchor_count(anchor_mask.sum(1), maskable.sum(1), cfg.s_pre)
    pre = _nested_exact(anchor_mask, count, maskable, generator)
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
