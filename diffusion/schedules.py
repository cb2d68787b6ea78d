"""Noise schedules of the absorbing (mask) forward process, and the sampling of times t.

Convention (as in MDLM, LLaDA and diffusers' discrete schedulers): t = 0 is clean data and t = 1
is (nearly) fully masked. Each token is masked independently with probability 1 - alpha(t):

    q(x_t^i | x_0^i) = alpha(t) * delta(x_0^i) + (1 - alpha(t)) * delta(mask).

The continuous-time NELBO weights the cross-entropy of a masked token by

    weight(t) = -alpha'(t) / (1 - alpha(t))                     (MDLM eq. 10, MD4, RADD)

which is exactly 1/t for the linear and log-linear schedules. For any schedule the weight
integrates to alpha(0) - alpha(1) against the masking probability, so every token's cross-entropy
receives total weight one when alpha(1) = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CosineSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "Schedule",
    "sample_t",
]

# weight(t) clamps t from below to this floor rather than adding an epsilon to the denominator,
# so that weight(t) == -alpha'(t) / (1 - alpha(t)) holds to rounding for every t >= T_FLOOR.
T_FLOOR = 1e-6


def _as_time(t: Tensor | float) -> Tensor:
    """Tensors keep their float dtype (integers become the default dtype); Python numbers become
    float64 tensors, as Python floats are doubles."""
    if not isinstance(t, Tensor):
        return torch.tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class Schedule:
    """Base class: subclasses define `alpha`, `alpha_prime` and, for accuracy, `mask_prob`.

    All methods act elementwise on a float tensor (or Python float) t in [0, 1] and return a
    tensor of the same shape and dtype.
    """

    def alpha(self, t: Tensor | float) -> Tensor:
        """Probability that a token is still clean at time t; alpha(0) = 1."""
        raise NotImplementedError

    def alpha_prime(self, t: Tensor | float) -> Tensor:
        """d alpha / dt (non-positive)."""
        raise NotImplementedError

    def mask_prob(self, t: Tensor | float) -> Tensor:
        """1 - alpha(t), the probability that a token is masked at time t.

        Subclasses override this with a form that does not cancel catastrophically near t = 0.
        """
        return 1.0 - self.alpha(t)

    def weight(self, t: Tensor | float) -> Tensor:
        """NELBO weight -alpha'(t) / (1 - alpha(t)), with t clamped to [T_FLOOR, 1]."""
        t = _as_time(t).clamp(T_FLOOR, 1.0)
        return -self.alpha_prime(t) / self.mask_prob(t)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """alpha(t) = 1 - t (LLaDA, dllm "linear"): mask probability t, weight 1/t."""

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - _as_time(t)

    def alpha_prime(self, t: Tensor | float) -> Tensor:
        return torch.full_like(_as_time(t), -1.0)

    def mask_prob(self, t: Tensor | float) -> Tensor:
        return _as_time(t).clone()


@dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    """MDLM's default: total noise sigma(t) = -log(1 - (1 - eps) t), so alpha(t) = 1 - (1 - eps) t.

    alpha(1) = eps: a sequence is never fully masked at t = 1 (MDLM's choice); the weight is
    (1 - eps) / ((1 - eps) t) = 1/t.
    """

    eps: float = 1e-3

    def __post_init__(self):
        if not (isinstance(self.eps, (int, float)) and 0.0 <= self.eps < 1.0):
            raise ValueError(f"LogLinearSchedule: eps must be a float in [0, 1), got {self.eps!r}")

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - (1.0 - self.eps) * _as_time(t)

    def alpha_prime(self, t: Tensor | float) -> Tensor:
        return torch.full_like(_as_time(t), -(1.0 - self.eps))

    def mask_prob(self, t: Tensor | float) -> Tensor:
        return (1.0 - self.eps) * _as_time(t)


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """alpha(t) = eps + (1 - eps) cos(pi t / 2) (MDLM's "cosine"; eps = 0 by default).

    The mask probability (1 - eps)(1 - cos(pi t / 2)) grows quadratically near t = 0, so early
    times mask few tokens. The weight is (pi/2) sin(pi t / 2) / (1 - cos(pi t / 2))
    = (pi/2) cot(pi t / 4), independent of eps, and about 2/t near t = 0.
    """

    eps: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.eps, (int, float)) and 0.0 <= self.eps < 1.0):
            raise ValueError(f"CosineSchedule: eps must be a float in [0, 1), got {self.eps!r}")

    def alpha(self, t: Tensor | float) -> Tensor:
        # cos(pi t / 2) written as sin(pi (1 - t) / 2): exactly 0 at t = 1 in any precision.
        return self.eps + (1.0 - self.eps) * torch.sin(0.5 * math.pi * (1.0 - _as_time(t)))

    def alpha_prime(self, t: Tensor | float) -> Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * _as_time(t))

    def mask_prob(self, t: Tensor | float) -> Tensor:
        # 1 - cos(x) = 2 sin^2(x / 2), without cancellation near x = 0.
        return (1.0 - self.eps) * 2.0 * torch.sin(0.25 * math.pi * _as_time(t)) ** 2


def sample_t(
    batch_size: int,
    eps: float = 1e-3,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Draw one diffusion time per sequence: t = eps + (1 - eps) u, shape (batch_size,).

    With `antithetic=True` the u are a randomly shifted regular grid,
    u_i = (U + i / batch_size) mod 1 with a single U ~ U(0, 1): each u_i is marginally uniform and
    the batch covers [0, 1) evenly, which lowers the variance of the batch-mean loss (the aim of
    MDLM's antithetic sampling). With `antithetic=False` the u are iid uniform.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample_t: batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < 1.0):
        raise ValueError(f"sample_t: eps must be a float in [0, 1), got {eps!r}")
    dtype = dtype or torch.get_default_dtype()
    if antithetic:
        shift = torch.rand((), generator=generator, device=device, dtype=dtype)
        grid = torch.arange(batch_size, device=device, dtype=dtype) / batch_size
        u = torch.remainder(shift + grid, 1.0)
    else:
        u = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
    return eps + (1.0 - eps) * u
