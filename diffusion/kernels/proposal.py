"""What one sampler step proposes for its candidate positions, shared by the reference and the
Triton paths (`sampler.py`, `triton_sampler.py`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Proposal(NamedTuple):
    """Per candidate, in the row-major order of the candidates mask (that of `logits[mask]`).

    token: (N,) long; confidence: (N,) float64; finite: (N,) bool, False where the row's logits
    hold a NaN or infinity that makes the scores meaningless.
    """

    token: Tensor
    confidence: Tensor
    finite: Tensor


def random_confidence(rows: int, generator: torch.Generator | None, device) -> Tensor:
    """(rows,) float64 U(0, 1) confidences ("random" remasking)."""
    return torch.rand(rows, generator=generator, device=device, dtype=torch.float64)


def confidence_of(
    picked_score: Tensor, top: Tensor, probs: Tensor, total: Tensor, remasking: str
) -> Tensor:
    """The confidence of a proposal, for every deterministic remasking mode (one formula for
    every sampler path: the gathered reference rows, the compiled dense step).

    With z the scores (mask column -inf), top = max z, probs = exp(z - top) (unnormalised, (..., V))
    and total = probs.sum(-1), so p = probs / total:
    "low_confidence" p(proposal) = exp(z_proposal - top) / total; "margin" p_(1) - p_(2);
    "entropy" sum_v p_v log p_v. picked_score, top, total: (...,). "random" has no formula here
    (its confidences are uniform draws, `random_confidence`).
    """
    if remasking == "low_confidence":
        return (picked_score - top).exp() / total
    if remasking == "margin":
        top2 = probs.topk(2, dim=-1).values / total[..., None]
        return top2[..., 0] - top2[..., 1]
    if remasking == "entropy":
        return -torch.special.entr(probs / total[..., None]).sum(-1)
    raise ValueError(f"remasking {remasking!r} has no confidence formula (random draws instead)")
