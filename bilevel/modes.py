"""How :func:`bilevel.solve` differentiates its result: one small object per mode.

Notation: the inner loop runs ``K = steps`` optimizer steps ``w_{k+1} = U(w_k, s_k, theta)``
from ``w_0 = params0`` on ``f(w, theta, data_k)``, ``theta = meta``, and returns ``w_K``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from bilevel.linsolve import CG


@dataclass(frozen=True)
class Unrolled:
    """Exact derivative of the K-step procedure (reverse mode through every step).

    ``dw_K/dtheta`` and ``dw_K/dw_0`` include all second-order terms (MAML, Finn et al. 2017;
    hyper-parameter learning, Maclaurin et al. 2015). Memory grows linearly in K.
    """


@dataclass(frozen=True)
class Truncated:
    """Back-propagate through the last ``T`` steps only (truncated BPTT, Shaban et al. 2019).

    The iterate and optimizer state before those steps, ``(w_{K-T}, s_{K-T})``, are
    *detached*: treated as constants. So ``w_0`` gets no gradient when ``T < K`` and ``theta``
    and tensor hyper-parameters get only the contributions of the last ``T`` steps.
    ``Truncated(K)`` is exactly ``Unrolled()``; requires ``1 <= T <= steps``. Memory grows
    linearly in T, not K.
    """

    T: int

    def __post_init__(self):
        if isinstance(self.T, bool) or not isinstance(self.T, numbers.Integral):
            raise TypeError(f"Truncated T must be an int, got {type(self.T).__name__}")
        if self.T < 1:
            raise ValueError(f"Truncated T must be >= 1, got {self.T}")


@dataclass(frozen=True)
class FirstOrder:
    """No derivative through the inner updates (first-order MAML, Finn et al. 2017; Reptile-
    style and MemDLM's inner loop).

    Returns ``w_K`` with ``dw_K/dw_0 = I`` (straight-through) and ``dw_K/dtheta = 0``: meta,
    tensors the inner loss closes over and tensor hyper-parameters get no gradient through the
    loop, and no autograd graph is kept between steps. Memory is constant in K.
    """


@dataclass(frozen=True)
class Implicit:
    """Implicit function theorem at ``w_K``, assumed to be a stationary point of ``f``.

    ``dL/dtheta = -(d2f/dw dtheta)^T (d2f/dw2 + damping*I)^-1 dL/dw_K`` (Bengio 2000;
    Pedregosa 2016; iMAML, Rajeswaran et al. 2019), with the linear system solved by
    ``linsolve`` (``CG`` by default, or ``Neumann``, ``NormalCG``; the damping lives in the
    solver). ``w_0`` gets no gradient, nor do tensors the inner loss closes over. With per-step
    data the optimality condition uses the last step's data. Memory is constant in K.

    Stationarity check: the gradient at ``w_K`` is evaluated once; ``w_K`` counts as stationary
    when ``||grad f(w_K)|| <= max(stationarity_rtol * scale, stationarity_atol)``, where
    ``scale`` is ``stationarity_scale`` when given, else ``||grad f(w_0)||``. Eagerly a
    :class:`~bilevel.BilevelWarning` is emitted when it fails; ``return_info=True`` reports
    ``final_grad_norm`` and ``stationary`` (per task under ``vmap``). With a warm start ``w_0``
    is already near stationary, so ``||grad f(w_0)||`` is small and the default reference would
    demand far more than the hypergradient needs: set ``stationarity_scale`` once to the
    gradient norm of a cold start (e.g. ``info["grad_norm"][0]`` of the first solve).
    """

    linsolve: Any = None
    stationarity_rtol: float = 1e-3
    stationarity_atol: float = 1e-8
    stationarity_scale: float | None = None

    def __post_init__(self):
        if self.linsolve is None:
            object.__setattr__(self, "linsolve", CG())
        if not callable(self.linsolve):
            raise TypeError(
                f"Implicit linsolve must be a solver such as bl.CG(), got {self.linsolve!r}"
            )
        for name in ("stationarity_rtol", "stationarity_atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"Implicit {name} must be a float >= 0, got {value!r}")
        scale = self.stationarity_scale
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not 0 < scale < float("inf")
        ):
            raise ValueError(
                f"Implicit stationarity_scale must be None or a finite float > 0, got {scale!r}"
            )


Mode = Unrolled | Truncated | FirstOrder | Implicit
