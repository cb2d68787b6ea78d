"""Linear solvers: exact answers on small systems, closed-form Neumann, diagnostics, vmap."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl


def _system(spd, d=6, cond=50.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = spd(d, cond, gen)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    return A, b


def test_cg_solves_spd_systems_within_d_iterations(spd):
    A, b = _system(spd)
    for damping in (0.0, 0.7):
        x, info = bl.CG(maxiter=20, tol=1e-12, damping=damping)(lambda v: A @ v, b)
        expected = torch.linalg.solve(A + damping * torch.eye(6, dtype=torch.float64), b)
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)
        assert info.converged is True and info.iterations <= 6 + 1
        assert float(info.residual) <= 1e-12


def test_normal_cg_solves_non_symmetric_systems():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64) + 4 * torch.eye(
        5, dtype=torch.float64
    )
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    assert not torch.allclose(A, A.T)
    for damping in (0.0, 0.5):
        x, info = bl.NormalCG(maxiter=50, tol=1e-12, damping=damping)(
            lambda v: A @ v, b, rmatvec=lambda v: A.T @ v
        )
        expected = torch.linalg.solve(A + damping * torch.eye(5, dtype=torch.float64), b)
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)
        assert info.converged is True
    with pytest.raises(ValueError, match="NormalCG needs rmatvec"):
        bl.NormalCG()(lambda v: A @ v, b)


def test_neumann_equals_its_closed_form(spd):
    """alpha * sum_{j<N} (I - alpha B)^j b == (I - (I - alpha B)^N) B^-1 b (anchors P2 d)."""
    A, b = _system(spd, cond=5.0)
    eye = torch.eye(6, dtype=torch.float64)
    for steps, alpha, damping in ((1, 0.1, 0.0), (7, 0.15, 0.0), (12, 0.1, 0.3)):
        B = A + damping * eye
        x, info = bl.Neumann(steps=steps, alpha=alpha, damping=damping)(lambda v: A @ v, b)
        M_N = torch.linalg.matrix_power(eye - alpha * B, steps)
        torch.testing.assert_close(
            x, (eye - M_N) @ torch.linalg.solve(B, b), rtol=1e-12, atol=1e-13
        )
        assert info.iterations == steps - 1 and info.converged is None
        torch.testing.assert_close(
            info.residual, torch.linalg.vector_norm(b - B @ x) / torch.linalg.vector_norm(b)
        )


def test_zero_right_hand_side_and_one_dimensional_systems():
    for solver in (bl.CG(), bl.NormalCG()):
        x, info = solver(
            lambda v: 3.0 * v, torch.zeros(4, dtype=torch.float64), rmatvec=lambda v: 3.0 * v
        )
        assert torch.equal(x, torch.zeros(4, dtype=torch.float64)) and info.iterations == 0
        # a 1-element system (what a 0-d solution flattens to) needs one iteration, not zero
        x, info = solver(
            lambda v: 4.0 * v, torch.tensor([2.0], dtype=torch.float64), rmatvec=lambda v: 4.0 * v
        )
        torch.testing.assert_close(x, torch.tensor([0.5], dtype=torch.float64))
        assert info.iterations == 1


def test_cg_warns_at_maxiter_and_reports_the_residual(spd):
    A, b = _system(spd, d=8, cond=1e4)
    with pytest.warns(bl.BilevelWarning, match="CG hit maxiter=2"):
        x, info = bl.CG(maxiter=2, tol=1e-12)(lambda v: A @ v, b)
    assert info.converged is False and info.iterations == 2
    true_residual = torch.linalg.vector_norm(b - A @ x) / torch.linalg.vector_norm(b)
    torch.testing.assert_close(info.residual, true_residual, rtol=1e-8, atol=0)
    assert float(info.residual) > 1e-12


def _indefinite(d=8, seed=0):
    """A symmetric matrix with eigenvalues of both signs, away from zero, and a right-hand side."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eigenvalues = torch.linspace(-3.0, 5.0, d, dtype=torch.float64)
    eigenvalues = torch.where(eigenvalues.abs() < 0.3, eigenvalues + 0.7, eigenvalues)
    return Q @ torch.diag(eigenvalues) @ Q.T, torch.randn(d, generator=gen, dtype=torch.float64)


def test_cg_on_an_indefinite_system_is_plain_cg_and_reports_the_curvature():
    """No early exit at non-positive curvature: the first direction has p^T A p < 0 here, and CG
    goes on to the dense solution (within d iterations), with a warning and the flag set."""
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    b = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    with pytest.warns(bl.BilevelWarning, match="non-positive curvature"):
        x, info = bl.CG()(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.tensor([0.0, -0.5, 0.0], dtype=torch.float64))
    assert info.nonpositive_curvature is True and info.converged is True

    A, b = _indefinite()
    with pytest.warns(bl.BilevelWarning, match="non-positive curvature"):
        x, info = bl.CG(maxiter=40, tol=1e-12)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert info.nonpositive_curvature is True and info.converged is True


def test_cg_gives_one_answer_eagerly_and_under_vmap_on_indefinite_systems(spd):
    """The same system, eagerly and as one task of a vmapped batch: the same iterate and the same
    diagnostics (as tensors under vmap), converged or not, even at exactly zero curvature."""
    gen = torch.Generator().manual_seed(3)
    systems = [_indefinite(seed=s) for s in range(3)] + [(spd(8, 30.0, gen), torch.zeros(8))]
    # exactly zero curvature at the first step (p^T A p = 0): the guarded division stalls
    systems.append((torch.diag(torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)), torch.ones(8)))
    As = torch.stack([A for A, _ in systems])
    bs = torch.stack([b.to(torch.float64) for _, b in systems])
    for solver in (bl.CG(maxiter=40, tol=1e-12), bl.CG(maxiter=3, tol=1e-12)):

        def run(A, b, solver=solver):
            x, info = solver(lambda v: A @ v, b)
            return x, info.iterations, info.residual, info.converged, info.nonpositive_curvature

        batched = torch.func.vmap(run)(As, bs)
        for i, (A, b) in enumerate(systems):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", bl.BilevelWarning)
                x, info = solver(lambda v, A=A: A @ v, b.to(torch.float64))
            torch.testing.assert_close(batched[0][i], x, rtol=1e-10, atol=1e-11)
            assert int(batched[1][i]) == info.iterations
            torch.testing.assert_close(batched[2][i], info.residual, rtol=1e-9, atol=1e-12)
            assert bool(batched[3][i]) == info.converged
            assert bool(batched[4][i]) == info.nonpositive_curvature
            if solver.maxiter == 40 and i < 3:
                assert info.converged and info.nonpositive_curvature
                torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


def test_solvers_run_fixed_trip_under_vmap(spd):
    """Under vmap nothing may branch on values: each system gets exactly maxiter iterations, and
    converged systems stay put (guarded divisions), so the batch equals a loop."""
    gen = torch.Generator().manual_seed(4)
    As = torch.stack([spd(4, c, gen) for c in (2.0, 10.0, 100.0)])
    bs = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bs[1] = 0.0  # a zero right-hand side must not produce 0/0
    for solver in (bl.CG(maxiter=30), bl.NormalCG(maxiter=60), bl.Neumann(steps=5, alpha=0.005)):

        def run(A, b, solver=solver):
            return solver(lambda v: A @ v, b, rmatvec=lambda v: A.T @ v)[0]

        batched = torch.func.vmap(run)(As, bs)
        looped = torch.stack([run(A, b) for A, b in zip(As, bs)])
        torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(batched).all()


def test_solvers_validate_arguments():
    with pytest.raises(ValueError, match="CG maxiter must be an int >= 1"):
        bl.CG(maxiter=0)
    with pytest.raises(ValueError, match="CG tol must be a float >= 0"):
        bl.CG(tol=-1.0)
    with pytest.raises(ValueError, match="NormalCG damping must be a float >= 0"):
        bl.NormalCG(damping=float("nan"))
    with pytest.raises(ValueError, match="Neumann alpha must be > 0"):
        bl.Neumann(alpha=0.0)
    with pytest.raises(ValueError, match="Neumann steps must be an int >= 1"):
        bl.Neumann(steps=2.5)
