"""Matrix-free linear solvers for implicit differentiation.

Every solver is a frozen dataclass called as ``solver(matvec, b, rmatvec=None)`` and solves
``(A + damping*I) x = b`` for a 1-D ``b``, where ``matvec(v) = A v`` and, for solvers that need
it, ``rmatvec(v) = A^T v``. It returns ``(x, LinsolveInfo)``.

Outside ``vmap`` and ``torch.compile`` the iterative solvers stop early once
``||r|| <= tol * ||b||`` and check their assumptions; under those transforms (where a tensor
cannot steer Python control flow) they run exactly ``maxiter`` iterations, with divisions
guarded so that a converged iterate stays put.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from bilevel._warn import is_concrete, warn

MatVec = Callable[[Tensor], Tensor]


class LinsolveInfo(NamedTuple):
    """What a solve did.

    ``iterations``: operator applications of the main loop. ``residual``: the relative
    residual ``||b - (A + damping*I) x|| / ||b||`` (0-d tensor; 0 when ``b == 0``).
    ``converged``: ``residual <= tol``; ``None`` when it could not be decided (under ``vmap``
    or compile) or for :class:`Neumann`, which has no tolerance.
    """

    iterations: int
    residual: Tensor
    converged: bool | None


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_nonnegative(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0: keeps a converged fixed-trip iteration still."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)


def _relative(residual_norm: Tensor, b_norm: Tensor) -> Tensor:
    return _safe_div(residual_norm, b_norm)


def _warn_maxiter(name: str, maxiter: int, residual: Tensor, tol: float) -> None:
    warn(
        f"{name} hit maxiter={maxiter} with relative residual {float(residual.detach()):.3e} > "
        f"tol={tol:g}; the implicit gradient is inexact (raise maxiter, add damping, or "
        "loosen tol)"
    )


@dataclass(frozen=True)
class CG:
    """Conjugate gradients for symmetric positive-definite ``A + damping*I``.

    Hestenes & Stiefel (1952). ``damping`` (Tikhonov/ridge) gives ``(A + damping*I)^-1``.
    Non-positive curvature ``p^T (A + damping*I) p <= 0`` means the assumption is violated:
    the solver warns and stops (outside vmap/compile).
    """

    maxiter: int = 100
    tol: float = 1e-6
    damping: float = 0.0

    requires_symmetric = True

    def __post_init__(self):
        _check_positive_int(self.maxiter, "CG maxiter")
        _check_nonnegative(self.tol, "CG tol")
        _check_nonnegative(self.damping, "CG damping")

    def __call__(
        self, matvec: MatVec, b: Tensor, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinsolveInfo]:
        concrete = is_concrete()
        b_norm = torch.linalg.vector_norm(b)
        x = torch.zeros_like(b)
        r, p = b, b
        rs = torch.dot(r, r)
        iterations = 0
        if concrete and float(b_norm.detach()) == 0.0:
            return x, LinsolveInfo(0, torch.zeros_like(b_norm), True)
        for iterations in range(1, self.maxiter + 1):
            Ap = matvec(p) + self.damping * p
            curvature = torch.dot(p, Ap)
            if concrete and float(curvature.detach()) <= 0.0:
                warn(
                    "CG met non-positive curvature p^T(A + damping*I)p = "
                    f"{float(curvature.detach()):.3e} "
                    f"at iteration {iterations}: the system is not symmetric positive definite, "
                    "so CG's result is unreliable (is the inner problem at a minimum? add "
                    "damping, or use NormalCG for non-symmetric or indefinite systems)"
                )
                residual = _relative(torch.sqrt(rs), b_norm)
                return x, LinsolveInfo(iterations, residual, False)
            alpha = _safe_div(rs, curvature)
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = torch.dot(r, r)
            if concrete and float(rs_new.detach().sqrt()) <= self.tol * float(b_norm.detach()):
                return x, LinsolveInfo(iterations, _relative(torch.sqrt(rs_new), b_norm), True)
            p = r + _safe_div(rs_new, rs) * p
            rs = rs_new
        residual = _relative(torch.sqrt(rs), b_norm)
        if not concrete:
            return x, LinsolveInfo(iterations, residual, None)
        converged = float(residual.detach()) <= self.tol
        if not converged:
            _warn_maxiter("CG", self.maxiter, residual, self.tol)
        return x, LinsolveInfo(iterations, residual, converged)


@dataclass(frozen=True)
class NormalCG:
    """CG on the normal equations (CGNR) for any square, possibly non-symmetric ``A``.

    Minimises ``||b - (A + damping*I) x||`` over Krylov spaces of ``B^T B`` with
    ``B = A + damping*I`` (Hestenes & Stiefel 1952, §10); needs ``rmatvec(v) = A^T v``.
    Use it for fixed points and other non-symmetric optimality conditions. Converges like CG
    on ``B^T B``, i.e. with the *squared* condition number.
    """

    maxiter: int = 100
    tol: float = 1e-6
    damping: float = 0.0

    requires_symmetric = False

    def __post_init__(self):
        _check_positive_int(self.maxiter, "NormalCG maxiter")
        _check_nonnegative(self.tol, "NormalCG tol")
        _check_nonnegative(self.damping, "NormalCG damping")

    def __call__(
        self, matvec: MatVec, b: Tensor, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinsolveInfo]:
        if rmatvec is None:
            raise ValueError("NormalCG needs rmatvec (v -> A^T v); none was given")
        concrete = is_concrete()
        b_norm = torch.linalg.vector_norm(b)
        x = torch.zeros_like(b)
        r = b
        if concrete and float(b_norm.detach()) == 0.0:
            return x, LinsolveInfo(0, torch.zeros_like(b_norm), True)
        z = rmatvec(r) + self.damping * r
        p = z
        zz = torch.dot(z, z)
        iterations = 0
        for iterations in range(1, self.maxiter + 1):
            w = matvec(p) + self.damping * p
            alpha = _safe_div(zz, torch.dot(w, w))
            x = x + alpha * p
            r = r - alpha * w
            r_norm = torch.linalg.vector_norm(r)
            if concrete and float(r_norm.detach()) <= self.tol * float(b_norm.detach()):
                return x, LinsolveInfo(iterations, _relative(r_norm, b_norm), True)
            z = rmatvec(r) + self.damping * r
            zz_new = torch.dot(z, z)
            p = z + _safe_div(zz_new, zz) * p
            zz = zz_new
        residual = _relative(torch.linalg.vector_norm(r), b_norm)
        if not concrete:
            return x, LinsolveInfo(iterations, residual, None)
        converged = float(residual.detach()) <= self.tol
        if not converged:
            _warn_maxiter("NormalCG", self.maxiter, residual, self.tol)
        return x, LinsolveInfo(iterations, residual, converged)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series ``x = alpha * sum_{j=0}^{steps-1} (I - alpha*B)^j b``.

    ``B = A + damping*I``; equals ``(I - (I - alpha*B)^steps) B^-1 b`` and converges to
    ``B^-1 b`` when the spectral radius of ``I - alpha*B`` is < 1 (Lorraine et al., 2020).
    ``steps`` counts the terms (``steps - 1`` operator applications; TorchOpt's and Betty's
    ``K`` correspond to ``steps = K + 1``). One extra application reports the residual.
    Works for non-symmetric ``A``: with ``alpha = 1`` and ``A = I - J`` it is the fixed-point
    adjoint iteration ``u <- J u + b``.
    """

    steps: int = 50
    alpha: float = 1.0
    damping: float = 0.0

    requires_symmetric = False

    def __post_init__(self):
        _check_positive_int(self.steps, "Neumann steps")
        _check_nonnegative(self.alpha, "Neumann alpha")
        if self.alpha == 0:
            raise ValueError("Neumann alpha must be > 0, got 0")
        _check_nonnegative(self.damping, "Neumann damping")

    def __call__(
        self, matvec: MatVec, b: Tensor, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinsolveInfo]:
        term, total = b, b
        for _ in range(self.steps - 1):
            term = term - self.alpha * (matvec(term) + self.damping * term)
            total = total + term
        x = self.alpha * total
        residual = torch.linalg.vector_norm(b - matvec(x) - self.damping * x)
        relative = _relative(residual, torch.linalg.vector_norm(b))
        return x, LinsolveInfo(self.steps - 1, relative, None)
