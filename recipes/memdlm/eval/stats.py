"""Paired statistics over seeds: Student's t interval, the smallest detectable difference and the
verdict the comparison prints.

Each seed gives one paired difference d_i = MemDLM_i - Standard_i (same data order, anchors and
evaluation set), so the seeds are the sample and the t distribution with n - 1 degrees of freedom
is the reference (Student 1908). With mean d̄ and sample sd s:

    95% interval      d̄ ± t(0.975; n-1) · s / √n
    detectable (80%)  (t(0.975; n-1) + t(0.80; n-1)) · s / √n

The second is the usual normal-approximation power formula with t quantiles in place of z: a true
difference at least this large would have been found (interval excluding 0) in about 80% of
repetitions of this experiment. It is a property of the run's noise, not of the result.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

CONFIDENCE = 0.95
POWER = 0.80


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta I_x(a, b) (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom: 1 - I_{df/(df+t²)}(df/2, 1/2) / 2."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on `t_cdf` (monotone; 1e-12 absolute)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def paired_interval(differences: list[float]) -> dict[str, Any]:
    """Mean, sd, 95% t interval and the smallest detectable difference of paired differences.

    Returns {"n", "mean", "sd", "low", "high", "detectable"}; with fewer than two finite values
    the interval and `detectable` are None (one seed says nothing about seed noise).
    """
    values = [float(v) for v in differences if v is not None and math.isfinite(v)]
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None, "detectable": None}
    sd = statistics.stdev(values)
    se = sd / math.sqrt(n)
    t_conf = t_quantile(0.5 + CONFIDENCE / 2, n - 1)
    t_power = t_quantile(POWER, n - 1)
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "low": mean - t_conf * se,
        "high": mean + t_conf * se,
        "detectable": (t_conf + t_power) * se,
    }


def verdict(
    name: str,
    interval: dict[str, Any],
    *,
    unit: str = "",
    scale: float = 1.0,
    label: str = "MemDLM",
) -> str:
    """One sentence that claims no more than the interval allows: the sign of MemDLM - Standard
    only when the 95% interval excludes zero, else "no difference detectable at this scale".

    name: what was compared ("fast-weights-off eval loss"); unit: printed after numbers;
    scale: 100 prints fractions as percentage points; label: what is compared with Standard.
    """
    n, mean = interval["n"], interval["mean"]
    if n == 0 or not math.isfinite(mean):
        return f"{name}: no paired seeds finished."
    fmt = lambda v: f"{scale * v:+.3g}{unit}"  # noqa: E731 - local formatter
    if interval["low"] is None:
        return (
            f"{name}: {label} - Standard = {fmt(mean)} on one seed; no interval "
            "(run --seeds 3 or more to tell a difference from seed noise)."
        )
    span = (
        f"mean {fmt(mean)}, 95% CI [{fmt(interval['low'])}, {fmt(interval['high'])}] over {n} "
        f"seeds; smallest detectable ±{scale * interval['detectable']:.3g}{unit}"
    )
    if interval["sd"] == 0.0 and mean == 0.0:
        return f"{name}: identical on every seed ({span}): no difference detectable at this scale."
    if interval["low"] <= 0.0 <= interval["high"]:
        return f"{name}: no difference detectable at this scale ({span})."
    direction = "lower" if mean < 0 else "higher"
    return f"{name}: {label} is {direction} than Standard ({span})."
