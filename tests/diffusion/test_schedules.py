"""Schedule calculus (alpha, alpha', weight) and the time samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffusion as dd
from diffusion.schedules import T_FLOOR

SCHEDULES = [
    dd.LinearSchedule(),
    dd.LogLinearSchedule(),
    dd.LogLinearSchedule(eps=0.1),
    dd.CosineSchedule(),
    dd.CosineSchedule(eps=0.05),
]
ALPHA_AT_ONE = [0.0, 1e-3, 0.1, 0.0, 0.05]


def _grid(dtype=torch.float64):
    return torch.linspace(1e-3, 1.0, 257, dtype=dtype)


@pytest.mark.parametrize(("schedule", "alpha_one"), list(zip(SCHEDULES, ALPHA_AT_ONE)))
def test_alpha_boundary_values_and_monotone(schedule, alpha_one):
    assert float(schedule.alpha(0.0)) == pytest.approx(1.0, abs=1e-15)
    assert float(schedule.alpha(1.0)) == pytest.approx(alpha_one, abs=1e-15)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert bool((alpha.diff() <= 0).all()) and bool(((alpha >= 0) & (alpha <= 1)).all())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_prime_matches_autograd(schedule):
    t = _grid().requires_grad_()
    (autograd,) = torch.autograd.grad(schedule.alpha(t).sum(), t)
    torch.testing.assert_close(schedule.alpha_prime(t.detach()), autograd, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_prob_is_one_minus_alpha_without_cancellation(schedule):
    t = _grid()
    torch.testing.assert_close(schedule.mask_prob(t), 1 - schedule.alpha(t), rtol=1e-12, atol=1e-15)
    # In float32, 1 - alpha(t) loses all digits near t = 0; mask_prob must not.
    tiny = torch.tensor([1e-5, 1e-4], dtype=torch.float32)
    reference = schedule.mask_prob(tiny.double())
    torch.testing.assert_close(schedule.mask_prob(tiny).double(), reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    t = _grid()
    expected = -schedule.alpha_prime(t) / (1 - schedule.alpha(t))
    # rtol 1e-9, not 1e-15: the reference's own 1 - alpha(t) cancels to ~1e-6 at t = 1e-3 (cosine).
    torch.testing.assert_close(schedule.weight(t), expected, rtol=1e-9, atol=0)
    assert bool((schedule.weight(t) > 0).all())


@pytest.mark.parametrize("schedule", [dd.LinearSchedule(), dd.LogLinearSchedule(eps=0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_is_one_over_t_for_linear_and_loglinear(schedule, dtype):
    t = _grid(dtype)
    torch.testing.assert_close(schedule.weight(t), 1 / t, rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_cosine_weight_closed_form():
    t = _grid()
    expected = 0.5 * math.pi / torch.tan(0.25 * math.pi * t)
    for eps in (0.0, 0.3):
        torch.testing.assert_close(
            dd.CosineSchedule(eps=eps).weight(t), expected, rtol=1e-12, atol=0
        )


@pytest.mark.parametrize(("schedule", "alpha_one"), list(zip(SCHEDULES, ALPHA_AT_ONE)))
def test_weight_integrates_to_total_masking_mass(schedule, alpha_one):
    """int_0^1 weight(t) P(masked at t) dt = alpha(0) - alpha(1): each token's CE gets total
    weight one when alpha(1) = 0 (Gauss-Legendre quadrature, 64 nodes)."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    t = torch.tensor(0.5 * (nodes + 1))
    integral = float(
        (0.5 * torch.tensor(weights) * schedule.weight(t) * schedule.mask_prob(t)).sum()
    )
    assert integral == pytest.approx(1.0 - alpha_one, abs=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_weight_clamps_t_instead_of_adding_an_epsilon(schedule):
    at_zero = schedule.weight(torch.tensor([0.0], dtype=torch.float64))
    assert bool(torch.isfinite(at_zero).all())
    torch.testing.assert_close(
        at_zero, schedule.weight(torch.tensor([T_FLOOR], dtype=torch.float64))
    )


@pytest.mark.parametrize("eps", [1.0, -0.1, "0.1"])
def test_schedule_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        dd.LogLinearSchedule(eps=eps)
    with pytest.raises(ValueError, match="eps"):
        dd.CosineSchedule(eps=eps)


@pytest.mark.parametrize("antithetic", [True, False])
def test_sample_t_range_shape_dtype(antithetic, gen):
    t = dd.sample_t(1000, eps=0.05, antithetic=antithetic, generator=gen)
    assert t.shape == (1000,) and t.dtype == torch.get_default_dtype()
    assert float(t.min()) >= 0.05 and float(t.max()) <= 1.0
    t64 = dd.sample_t(3, generator=gen, dtype=torch.float64)
    assert t64.dtype == torch.float64


def test_antithetic_sample_t_is_a_shifted_grid(gen):
    n, eps = 16, 1e-3
    u = (dd.sample_t(n, eps=eps, generator=gen, dtype=torch.float64) - eps) / (1 - eps)
    spacing = torch.sort(u).values.diff()
    torch.testing.assert_close(spacing, torch.full_like(spacing, 1 / n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("antithetic", [True, False])
def test_sample_t_is_marginally_uniform(antithetic, gen, chi2_pvalue):
    """Every element of the batch is U(eps, 1) (chi-square on 10 bins, 4000 draws, p > 1e-3)."""
    draws = torch.stack(
        [dd.sample_t(4, eps=0.0, antithetic=antithetic, generator=gen) for _ in range(4000)]
    )
    for column in (0, 3):
        counts = torch.histc(draws[:, column], bins=10, min=0, max=1)
        assert chi2_pvalue(counts, torch.full((10,), 0.1)) > 1e-3


def test_antithetic_sampling_lowers_the_variance_of_batch_means(gen):
    def batch_means(antithetic):
        t = torch.stack([dd.sample_t(16, antithetic=antithetic, generator=gen) for _ in range(500)])
        return (1 / t.clamp(min=0.05)).mean(1)  # a 1/t-shaped integrand, as in the loss

    assert float(batch_means(True).var()) < 0.2 * float(batch_means(False).var())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(batch_size=0), ValueError),
        (dict(batch_size=2.0), ValueError),
        (dict(batch_size=2, eps=1.0), ValueError),
        (dict(batch_size=2, eps=-1e-3), ValueError),
    ],
)
def test_sample_t_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        dd.sample_t(**kwargs)
