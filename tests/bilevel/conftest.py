"""Closed-form reference problems for the bilevel tests (anchors §3.2), as fixtures.

Fixtures rather than an importable helper module, so that the tests import the same way under
pytest's prepend and importlib import modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass
class LinearQuadratic:
    """P2: inner f(w, theta) = 1/2 w^T A w - w^T (B theta + c),
    outer F(w, theta) = 1/2 ||w - w_t||^2 + 1/2 theta^T D theta.

    ``w`` is split into two leaves ``a`` (first ``split`` coordinates) and ``b`` (the rest),
    coupled through the off-diagonal blocks of A, so a block-diagonal solver would be wrong.
    """

    A: torch.Tensor  # (d, d) SPD
    B: torch.Tensor  # (d, p)
    c: torch.Tensor  # (d,)
    w_t: torch.Tensor  # (d,)
    D: torch.Tensor  # (p, p)
    w0: torch.Tensor  # (d,)
    theta: torch.Tensor  # (p,)
    split: int

    @property
    def d(self) -> int:
        return self.A.shape[0]

    def tree(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": w[: self.split], "b": w[self.split :]}

    def vector(self, tree: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tree["a"], tree["b"]])

    def inner(self, params, theta, data=None) -> torch.Tensor:
        w = self.vector(params)
        return 0.5 * w @ self.A @ w - w @ (self.B @ theta + self.c)

    def outer(self, params, theta) -> torch.Tensor:
        w = self.vector(params)
        return 0.5 * ((w - self.w_t) ** 2).sum() + 0.5 * theta @ self.D @ theta

    def w_star(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.A, self.B @ theta + self.c)

    def M(self, alpha: float) -> torch.Tensor:
        return torch.eye(self.d) - alpha * self.A

    def gd_iterate(self, theta: torch.Tensor, alpha: float, K: int) -> torch.Tensor:
        """w_K = M^K w_0 + (I - M^K) A^-1 (B theta + c) (anchors P2 b)."""
        MK = torch.linalg.matrix_power(self.M(alpha), K)
        return MK @ self.w0 + (torch.eye(self.d) - MK) @ self.w_star(theta)


def _spd(d: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    return Q @ torch.diag(eigenvalues) @ Q.T


@pytest.fixture
def make_lq():
    """Factory: ``make_lq(d=5, p=3, cond=10.0, seed=0)`` -> a float64 :class:`LinearQuadratic`."""

    def make(d: int = 5, p: int = 3, cond: float = 10.0, seed: int = 0) -> LinearQuadratic:
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        return LinearQuadratic(
            A=_spd(d, cond, gen),
            B=randn(d, p),
            c=randn(d),
            w_t=randn(d),
            D=0.5 * torch.eye(p, dtype=torch.float64),
            w0=randn(d),
            theta=randn(p),
            split=2,
        )

    return make


@pytest.fixture
def spd():
    """Factory: ``spd(d, cond, gen)`` -> a (d, d) float64 SPD matrix with condition number cond."""
    return _spd
