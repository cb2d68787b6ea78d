"""Forward corruption (Bernoulli masking marginals, maskable respected) and nested masks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import diffusion as dd

MASK = 9


def _z(count: float, n: float, p: float) -> float:
    return (count - n * p) / math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize(
    "schedule", [dd.LinearSchedule(), dd.CosineSchedule(), dd.LogLinearSchedule(0.2)]
)
def test_corrupt_masks_independently_with_prob_one_minus_alpha(schedule, gen):
    """Binomial z-tests (|z| < 4.5) on the masked count per time, per position, and on pairs."""
    rows, length = 4000, 12
    x0 = torch.randint(0, MASK, (rows, length), generator=gen)
    t = torch.tensor([0.25, 0.8]).repeat_interleave(rows // 2)
    _, mask = dd.corrupt(x0, t, mask_id=MASK, schedule=schedule, generator=gen)
    for half, time in zip(mask.chunk(2), (0.25, 0.8)):
        p = float(schedule.mask_prob(time))
        assert abs(_z(half.sum().item(), half.numel(), p)) < 4.5
        per_position = half.sum(0)
        assert max(abs(_z(c, half.shape[0], p)) for c in per_position.tolist()) < 4.5
        both = (half[:, 0] & half[:, 1]).sum().item()  # independence: P(both) = p^2
        assert abs(_z(both, half.shape[0], p * p)) < 4.5


def test_corrupt_respects_maskable_and_writes_mask_id_exactly_on_the_mask(gen):
    x0 = torch.randint(0, MASK, (64, 20), generator=gen)
    maskable = torch.rand(64, 20, generator=gen) < 0.6
    t = dd.sample_t(64, generator=gen)
    xt, mask = dd.corrupt(x0, t, mask_id=MASK, schedule=dd.LinearSchedule(), maskable=maskable)
    assert mask.dtype == torch.bool and xt.dtype == x0.dtype
    assert not bool((mask & ~maskable).any())
    assert bool((xt[mask] == MASK).all()) and bool((xt[~mask] == x0[~mask]).all())


def test_corrupt_extreme_times(gen):
    x0 = torch.randint(0, MASK, (8, 10), generator=gen)
    maskable = torch.ones(8, 10, dtype=torch.bool)
    maskable[:, :3] = False  # a prompt
    s = dd.LinearSchedule()
    _, none = dd.corrupt(x0, torch.zeros(8), mask_id=MASK, schedule=s, maskable=maskable)
    _, full = dd.corrupt(x0, torch.ones(8), mask_id=MASK, schedule=s, maskable=maskable)
    assert not bool(none.any())
    assert bool((full == maskable).all())


def test_corrupt_is_deterministic_under_a_generator():
    x0 = torch.randint(0, MASK, (4, 16))
    t = torch.full((4,), 0.5)
    runs = [
        dd.corrupt(
            x0,
            t,
            mask_id=MASK,
            schedule=dd.LinearSchedule(),
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(t=torch.tensor([0.5, 1.1])), ValueError, r"t must lie in \[0, 1\]"),
        (dict(t=torch.tensor([-0.1, 0.5])), ValueError, r"t must lie in \[0, 1\]"),
        (dict(t=torch.tensor([float("nan"), 0.5])), ValueError, "t must lie"),
        (dict(t=torch.tensor([0.5, 0.5, 0.5])), ValueError, "t must have shape"),
        (dict(t=torch.tensor([1, 1])), TypeError, "t must be a float"),
        (dict(x0=torch.zeros(2, 5)), TypeError, "x0 must be a long"),
        (dict(x0=torch.zeros(2, 5, 1, dtype=torch.long)), ValueError, "x0 must have 2 dim"),
        (dict(x0=torch.full((2, 5), MASK)), ValueError, "x0 contains mask_id"),
        (dict(maskable=torch.ones(2, 4, dtype=torch.bool)), ValueError, "maskable must have shape"),
        (dict(maskable=torch.ones(2, 5)), TypeError, "maskable must be a bool"),
        (dict(mask_id=-1), ValueError, "mask_id must be >= 0"),
        (dict(mask_id=1.0), TypeError, "mask_id must be an int"),
        (dict(schedule="linear"), TypeError, "schedule must be a Schedule"),
    ],
)
def test_corrupt_rejects_bad_input(change, error, match):
    kwargs = dict(
        x0=torch.zeros(2, 5, dtype=torch.long),
        t=torch.tensor([0.5, 0.5]),
        mask_id=MASK,
        schedule=dd.LinearSchedule(),
        maskable=None,
    )
    kwargs.update(change)
    with dd.debug_checks(), pytest.raises(error, match=match):  # value checks are opt-in
        dd.corrupt(kwargs.pop("x0"), kwargs.pop("t"), **kwargs)


def _expected_n_pre(mask_row, maskable_row, ratio) -> int:
    n, m = int(maskable_row.sum()), int(mask_row.sum())
    return min(n, max(m, int(n * ratio)))  # the reference code's int(n * r_pre)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.45, 1.0, 1.7])
def test_nested_mask_has_exact_counts_and_contains_the_anchor(ratio, gen):
    rows, length = 200, 24
    maskable = torch.rand(rows, length, generator=gen) < 0.7
    mask = maskable & (torch.rand(rows, length, generator=gen) < 0.3)
    ratio_per_row = torch.rand(rows, generator=gen, dtype=torch.float64) * ratio
    for r in (ratio, ratio_per_row):
        nested = dd.nested_mask(mask, r, maskable=maskable, generator=gen)
        assert bool((nested | ~mask).all()), "not a superset of mask"
        assert not bool((nested & ~maskable).any()), "masked outside maskable"
        for b in range(rows):
            row_ratio = float(r[b]) if isinstance(r, torch.Tensor) else r
            assert int(nested[b].sum()) == _expected_n_pre(mask[b], maskable[b], row_ratio)


def test_nested_mask_default_maskable_and_scalar_tensor_ratio(gen):
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, 0] = True
    nested = dd.nested_mask(mask, torch.tensor(0.5), generator=gen)
    assert nested.sum(1).tolist() == [5, 5, 5] and bool(nested[:, 0].all())


def test_nested_mask_draws_the_extra_positions_uniformly(gen, chi2_pvalue):
    """2 extra positions out of 6 candidates: all 15 pairs equally likely (chi-square, p > 1e-3)."""
    maskable = torch.tensor([[False, True, True, True, True, True, True, True]])
    mask = torch.tensor([[False, True, False, False, False, False, False, False]])
    draws = 6000
    nested = dd.nested_mask(
        mask.expand(draws, -1), 3 / 7, maskable=maskable.expand(draws, -1), generator=gen
    )
    extra = (nested & ~mask)[:, 2:]  # the 6 candidates
    assert bool((extra.sum(1) == 2).all())
    pairs = list(itertools.combinations(range(6), 2))
    pair_index = {p: i for i, p in enumerate(pairs)}
    chosen = extra.nonzero()[:, 1].view(draws, 2)
    counts = torch.bincount(
        torch.tensor([pair_index[tuple(row)] for row in chosen.tolist()]), minlength=len(pairs)
    )
    assert chi2_pvalue(counts, torch.full((len(pairs),), 1 / len(pairs))) > 1e-3


@pytest.mark.parametrize(
    ("mask", "ratio", "maskable", "error", "match"),
    [
        (
            torch.ones(2, 4, dtype=torch.bool),
            0.5,
            torch.zeros(2, 4, dtype=torch.bool),
            ValueError,
            "subset",
        ),
        (torch.zeros(2, 4, dtype=torch.bool), -0.5, None, ValueError, "ratio must be finite"),
        (
            torch.zeros(2, 4, dtype=torch.bool),
            float("inf"),
            None,
            ValueError,
            "ratio must be finite",
        ),
        (
            torch.zeros(2, 4, dtype=torch.bool),
            torch.ones(3),
            None,
            ValueError,
            "ratio must have shape",
        ),
        (torch.zeros(2, 4, dtype=torch.bool), "0.5", None, TypeError, "ratio must be a float"),
        (torch.zeros(2, 4), 0.5, None, TypeError, "mask must be a bool"),
        (
            torch.zeros(2, 4, dtype=torch.bool),
            0.5,
            torch.ones(2, 3, dtype=torch.bool),
            ValueError,
            "maskable",
        ),
    ],
)
def test_nested_mask_rejects_bad_input(mask, ratio, maskable, error, match):
    with dd.debug_checks(), pytest.raises(error, match=match):  # value checks are opt-in
        dd.nested_mask(mask, ratio, maskable=maskable)
