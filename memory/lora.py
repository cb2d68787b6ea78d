"""Transient LoRA fast weights (Hu et al. 2021, as used for MemDLM's parametric memory).

At every target linear the model computes

    y = W x + b + (alpha / rank) * B A dropout(x),    A: (rank, in),  B: (out, rank),

with A and B taken from the bound state. MemDLM (arXiv 2603.22241, section 3.1; reference code
`InnerLoRALinear`) resets them before every inner loop to A ~ kaiming-uniform(a=sqrt(5)),
i.e. U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so the correction starts at exactly zero while
the gradient with respect to B does not vanish.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from memory.at_init import AtInit
from memory.fast_weights import FastWeights, Shape, batched_linear


class FastLoRA(FastWeights):
    """Low-rank fast weights on the named `nn.Linear` submodules of `model`.

    State keys per target: `"<target>.A"` (rank, in) and `"<target>.B"` (out, rank), each
    with an optional leading batch dim for per-sample fast weights.

    Args:
        model: any `nn.Module`; it is not modified, only hooked.
        targets: full dotted names of `nn.Linear` submodules (see `last_layers`, `select`).
        rank: LoRA rank r >= 1 (MemDLM: 32).
        alpha: scale numerator; the correction is multiplied by `alpha / rank` (MemDLM: 64).
        dropout: dropout probability on the LoRA branch input, active when the target module
            is in training mode. Under `torch.func.vmap` it needs `randomness="different"`.
    """

    _suffixes = ("A", "B")

    def __init__(
        self,
        model: nn.Module,
        targets: Iterable[str],
        rank: int = 32,
        alpha: float = 64.0,
        dropout: float = 0.0,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a positive float, got {alpha!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        super().__init__(model, targets)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor in front of B A x."""
        return self.alpha / self.rank

    def _param_shapes(self, linear: nn.Linear):
        return (self.rank, linear.in_features), (linear.out_features, self.rank)

    def _init_state(self, targets, batch, generator):
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) drawn target after target, B = 0 (Hu et al. 2021:
        B A = 0 at the start)."""
        state = []
        for linear, device, dtype in targets:
            shape_a, shape_b = self._param_shapes(linear)
            bound = 1.0 / math.sqrt(linear.in_features)
            a = uniform_draw(batch + shape_a, bound, generator, device, dtype)
            state.append((a, torch.zeros(batch + shape_b, device=device, dtype=dtype)))
        return state

    def _output_delta(self, linear, x, params):
        a, b = params
        mid = self._mid(linear, x, a)
        return F.linear(mid, b) if b.dim() == 2 else batched_linear(mid, b)

    def _output_at_init(self, linear, x, params, output):
        """At B = 0 the output is the base's; B's gradient needs only mid = s A x (made
        without a graph: A's gradient is zero there), `memory.at_init`."""
        a, b = params
        with torch.no_grad():
            mid = self._mid(linear, x, a)
        return AtInit.apply(output, mid, b, a)

    def _mid(self, linear, x, a):
        """s A dropout(x): (..., in) -> (..., rank); per sample when a is (B, rank, in)."""
        if self.dropout > 0.0 and linear.training:
            x = F.dropout(x, self.dropout, training=True)
        if a.dim() == 2:  # one state shared by the whole batch
            return F.linear(x, a) * self.scale
        return batched_linear(x, a) * self.scale

    def _weight_delta(self, params):
        a, b = params
        return self.scale * (b @ a)

    def _extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"


def uniform_draw(shape: Shape, bound: float, generator, device, dtype) -> torch.Tensor:
    """U(-bound, bound) of `shape` (LoRA's A), drawn on the generator's device (if any), then
    moved to `device`; kept here with its one user so a state's init stays in this file."""
    draw_on = generator.device if generator is not None else device
    sample = torch.empty(shape, device=draw_on, dtype=dtype)
    return sample.uniform_(-bound, bound, generator=generator).to(device)
