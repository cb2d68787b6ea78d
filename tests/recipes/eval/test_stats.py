"""The paired statistics of the comparison: t quantiles against closed forms and scipy, the
interval's coverage by simulation, and verdicts that never claim more than the interval."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from recipes.memdlm.eval.stats import paired_interval, regularized_beta, t_cdf, t_quantile, verdict

PROBABILITIES = (0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.999)


@pytest.mark.parametrize("p", PROBABILITIES)
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2 p (1 - p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    # Large df tends to the normal quantile (Cornish-Fisher: (z^3 + z) / 4df, then
    # (5z^5 + 16z^3 + 3z) / 96df^2, then O(df^-3)).
    z = statistics.NormalDist().inv_cdf(p)
    assert t_quantile(p, 1e6) == pytest.approx(z, abs=1e-5)
    df = 200
    expansion = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    assert t_quantile(p, df) == pytest.approx(expansion, abs=1e-5)
    assert t_quantile(1 - p, 7) == pytest.approx(-t_quantile(p, 7), rel=1e-12)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 29):
        for p in PROBABILITIES:
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)
            assert t_cdf(stats.t.ppf(p, df), df) == pytest.approx(p, abs=1e-12)


def test_textbook_values():
    # The two-sided 95% critical values of every t table.
    for df, expected in ((2, 4.302653), (4, 2.776445), (9, 2.262157)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_regularized_beta_closed_forms():
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b, on both sides of the fraction's switch.
    for x in (0.01, 0.3, 0.5, 0.7, 0.99):
        assert regularized_beta(2.5, 1.0, x) == pytest.approx(x**2.5, rel=1e-12)
        assert regularized_beta(1.0, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5, rel=1e-12)
    assert regularized_beta(2.0, 3.0, 0.0) == 0.0 and regularized_beta(2.0, 3.0, 1.0) == 1.0


def test_interval_closed_form_on_three_values():
    result = paired_interval([0.1, 0.2, 0.6])
    mean, sd = 0.3, statistics.stdev([0.1, 0.2, 0.6])
    half = 4.302652729911275 * sd / math.sqrt(3)
    assert result["n"] == 3 and result["mean"] == pytest.approx(mean)
    assert result["low"] == pytest.approx(mean - half) and result["high"] == pytest.approx(
        mean + half
    )
    detectable = (4.302652729911275 + t_quantile(0.8, 2)) * sd / math.sqrt(3)
    assert result["detectable"] == pytest.approx(detectable)


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    # 4000 experiments of 3 normal differences: coverage is Binomial(4000, 0.95), sd 0.0034, so
    # +-0.012 is a 3.5-sigma band. A z interval (too narrow for n = 3) covers only about 0.83.
    rng = random.Random(0)
    covered = 0
    for _ in range(4000):
        interval = paired_interval([rng.gauss(0.7, 2.0) for _ in range(3)])
        covered += interval["low"] <= 0.7 <= interval["high"]
    assert abs(covered / 4000 - 0.95) < 0.012


def test_detectable_difference_has_about_80_percent_power():
    # A true difference equal to the expected detectable size is found in roughly 80% of
    # experiments (the formula is approximate for small n; 5 seeds, band 0.72-0.88).
    rng = random.Random(1)
    sigma, n = 1.0, 5
    typical = paired_interval([rng.gauss(0, sigma) for _ in range(20000)])  # sd estimate ~ sigma
    shift = (t_quantile(0.975, n - 1) + t_quantile(0.8, n - 1)) * typical["sd"] / math.sqrt(n)
    found = sum(
        paired_interval([rng.gauss(shift, sigma) for _ in range(n)])["low"] > 0 for _ in range(3000)
    )
    assert 0.72 < found / 3000 < 0.88


def test_one_seed_has_no_interval_and_nonfinite_values_are_ignored():
    assert paired_interval([0.4])["low"] is None
    assert paired_interval([0.4, math.nan])["detectable"] is None
    assert paired_interval([])["n"] == 0


def test_verdicts_follow_the_interval():
    no_diff = verdict("eval loss", paired_interval([0.1, -0.2, 0.05]), unit=" nats")
    assert "no difference detectable at this scale" in no_diff and "95% CI" in no_diff
    lower = verdict("eval loss", paired_interval([-0.30, -0.31, -0.29]), unit=" nats")
    assert "MemDLM is lower than Standard" in lower
    higher = verdict("NIAH exact", paired_interval([0.10, 0.12, 0.11]), unit=" pt", scale=100)
    assert "MemDLM is higher than Standard" in higher and "+11 pt" in higher
    same = verdict("NIAH exact", paired_interval([0.0, 0.0, 0.0]), unit=" pt", scale=100)
    assert "identical on every seed" in same and "no difference detectable" in same
    single = verdict("eval loss", paired_interval([0.3]))
    assert "one seed" in single and "no interval" in single
