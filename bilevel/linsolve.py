"""Matrix-free linear solvers for implicit differentiation.

Every solver is a frozen dataclass called as ``solver(matvec, b, rmatvec=None)`` and solves
``(A + damping*I) x = b`` for a 1-D ``b``, where ``matvec(v) = A v`` and, for solvers that need
it, ``rmatvec(v) = A^T v``. It returns ``(x, LinsolveInfo)``.

The iterative solvers give the same answer eagerly and under ``vmap``/``torch.compile``:
eagerly they stop once ``||r|| <= tol * ||b||``; under those transforms (where a tensor cannot
steer Python control flow) they run ``maxiter`` iterations and freeze each system from the
iteration where it met that test, so the iterate is the one the eager loop returns. Nothing
else (curvature, say) changes the course of an iteration; it is reported instead.
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
    ``converged``: ``residual <= tol``; ``None`` for :class:`Neumann`, which has no tolerance.
    ``nonpositive_curvature``: :class:`CG` met ``p^T (A + damping*I) p <= 0`` (the system is
    not positive definite); ``None`` for the other solvers.

    Eagerly ``iterations`` is an int and the flags are bools. Under ``vmap`` and compile they
    are tensors (an int64 count, bool flags), one per system, with the same values.
    """

    iterations: int | Tensor
    residual: Tensor
    converged: bool | Tensor | None
    nonpositive_curvature: bool | Tensor | None = None


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_nonnegative(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (for finite ``num``): keeps a converged
    fixed-trip iteration still. Dividing by inf costs one ``where`` less than masking twice."""
    return num / torch.where(den != 0, den, torch.inf)


def _relative(residual_norm: Tensor, b_norm: Tensor) -> Tensor:
    return _safe_div(residual_norm, b_norm)


def _finish(
    name: str,
    maxiter: int,
    tol: float,
    x: Tensor,
    r_norm: Tensor,
    b_norm: Tensor,
    done: Tensor,
    iterations: Tensor | int,
    negative: Tensor | None,
    concrete: bool,
) -> tuple[Tensor, LinsolveInfo]:
    """Package a Krylov solve's result; eagerly, turn the flags into Python values and warn."""
    residual = _relative(r_norm, b_norm)
    if not concrete:
        return x, LinsolveInfo(iterations, residual, done, negative)
    converged = bool(done)
    nonpositive = None if negative is None else bool(negative)
    if nonpositive:
        warn(
            f"{name} met non-positive curvature p^T(A + damping*I)p <= 0: the system is not "
            "positive definite (is the inner problem at a minimum?). CG went on as plain CG, "
            "exactly as under vmap; its result is the solution only if it converged "
            f"(relative residual {float(residual.detach()):.3e}). Add damping, or use "
            "NormalCG for indefinite systems",
            depth=2,
        )
    if not converged:
        warn(
            f"{name} hit maxiter={maxiter} with relative residual "
            f"{float(residual.detach()):.3e} > tol={tol:g}; the implicit gradient is inexact "
            "(raise maxiter, add damping, or loosen tol)",
            depth=2,
        )
    return x, LinsolveInfo(int(iterations), residual, converged, nonpositive)


@dataclass(frozen=True)
class CG:
    """Conjugate gradients for symmetric ``A + damping*I`` (Hestenes & Stiefel 1952).

    ``damping`` (Tikhonov/ridge) gives ``(A + damping*I)^-1``. The iteration is plain CG, the
    same eagerly and under ``vmap``/compile: it stops once ``||r|| <= tol * ||b||`` (eagerly
    by leaving the loop, under ``vmap`` by freezing a converged system, so both give the same
    iterate) and nothing else changes its course. Non-positive curvature
    ``p^T (A + damping*I) p <= 0`` means the system is not positive definite: CG goes on (as the
    textbook method and TorchOpt do; on a nonsingular indefinite system it usually still
    converges), the fact is reported in ``LinsolveInfo.nonpositive_curvature`` and, eagerly, by a
    warning.
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
        threshold = (self.tol * b_norm).square()
        solved = self._eager(matvec, b, threshold) if concrete else None
        if solved is not None:
            x, rs, iterations, negative = solved
            done = rs <= threshold
        else:
            x, rs, done, iterations, negative = self._masked(matvec, b, threshold)
        return _finish(
            "CG",
            self.maxiter,
            self.tol,
            x,
            rs.sqrt(),
            b_norm,
            done,
            iterations,
            negative,
            concrete,
        )

    def _apply(self, matvec: MatVec, p: Tensor) -> Tensor:
        return matvec(p) if self.damping == 0 else matvec(p) + self.damping * p

    def _eager(self, matvec: MatVec, b: Tensor, threshold: Tensor):
        """Plain CG that leaves the loop once converged: the arithmetic of :meth:`_masked`
        for an unconverged system, without its masks. ``None`` if some curvature was exactly
        0 (where only the guarded divisions of :meth:`_masked` give its answer)."""
        x, r, p = torch.zeros_like(b), b, b
        rs = torch.dot(r, r)
        curvatures = []
        while len(curvatures) < self.maxiter and not bool(rs <= threshold):
            Ap = self._apply(matvec, p)
            curvature = torch.dot(p, Ap)
            curvatures.append(curvature)
            alpha = rs / curvature
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = torch.dot(r, r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        if not curvatures:
            return x, rs, 0, torch.zeros((), dtype=torch.bool, device=b.device)
        curvatures = torch.stack(curvatures)
        zero, negative = torch.stack([(curvatures == 0).any(), (curvatures <= 0).any()]).tolist()
        if zero:
            return None
        return x, rs, len(curvatures), torch.tensor(negative)

    def _masked(self, matvec: MatVec, b: Tensor, threshold: Tensor):
        """``maxiter`` iterations for vmap/compile; a system that met the test stays frozen."""
        x, r, p = torch.zeros_like(b), b, b
        rs = torch.dot(r, r)
        negative = torch.zeros((), dtype=torch.bool, device=b.device)
        done = rs <= threshold  # b == 0 is solved by x = 0
        iterations = torch.zeros((), dtype=torch.long, device=b.device)
        for _ in range(self.maxiter):
            Ap = self._apply(matvec, p)
            curvature = torch.dot(p, Ap)
            active = ~done
            negative = negative | (active & (curvature <= 0))
            iterations = iterations + active.long()
            alpha = torch.where(active, _safe_div(rs, curvature), 0.0)
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = torch.dot(r, r)
            p = torch.where(active, r + _safe_div(rs_new, rs) * p, p)
            rs = rs_new
            done = done | (rs <= threshold)
        return x, rs, done, iterations, negative


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
        threshold = self.tol * b_norm
        x = torch.zeros_like(b)
        r = b
        r_norm = b_norm
        done = r_norm <= threshold
        iterations = torch.zeros((), dtype=torch.long, device=b.device)
        if concrete and bool(done):
            return _finish(
                "NormalCG",
                self.maxiter,
                self.tol,
                x,
                r_norm,
                b_norm,
                done,
                iterations,
                None,
                concrete,
            )
        z = rmatvec(r) + self.damping * r
        p = z
        zz = torch.dot(z, z)
        for _ in range(self.maxiter):
            if concrete and bool(done):
                break
            active = ~done
            iterations = iterations + active.long()
            w = matvec(p) + self.damping * p
            alpha = torch.where(active, _safe_div(zz, torch.dot(w, w)), 0.0)
            x = x + alpha * p
            r = r - alpha * w
            r_norm = torch.linalg.vector_norm(r)
            done = done | (r_norm <= threshold)
            if concrete and bool(done):
                break
            z = rmatvec(r) + self.damping * r
            zz_new = torch.dot(z, z)
            p = torch.where(active, z + _safe_div(zz_new, zz) * p, p)
            zz = torch.where(active, zz_new, zz)
        return _finish(
            "NormalCG", self.maxiter, self.tol, x, r_norm, b_norm, done, iterations, None, concrete
        )


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
