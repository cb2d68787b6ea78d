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
