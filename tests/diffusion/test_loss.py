"""The masked diffusion loss: normalisations by hand, the NELBO of analytic denoisers, precision."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusion as dd


def _hand_example():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    x0 = torch.tensor([[0, 1, 2], [3, 3, 1]])
    maskable = torch.tensor([[False, True, True], [True, True, True]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)  # linear weights 2 and 4
    ce = -logits.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)  # (2, 3)
    return logits, x0, maskable, mask, t, ce


def test_normalisations_match_the_formulas_by_hand():
    logits, x0, maskable, mask, t, ce = _hand_example()
    s = dd.LinearSchedule()
    row0 = 2 * (ce[0, 1] + ce[0, 2])
    row1 = 4 * ce[1, 1]
    expected = {
        "token": (row0 + row1) / 5,  # 5 maskable tokens
        "masked": (row0 + row1) / 3,  # 3 masked tokens
        "sequence": (row0 / 2 + row1 / 3) / 2,
    }
    for normalize, value in expected.items():
        loss = dd.masked_diffusion_loss(
            logits, x0, mask, t, schedule=s, maskable=maskable, normalize=normalize
        )
        torch.testing.assert_close(loss, value, rtol=1e-12, atol=0)
    per_token = dd.masked_diffusion_loss(
        logits, x0, mask, t, schedule=s, maskable=maskable, reduction="none"
    )
    expected_tokens = torch.zeros(2, 3, dtype=torch.float64)
    expected_tokens[0, 1:] = 2 * ce[0, 1:]
    expected_tokens[1, 1] = 4 * ce[1, 1]
    torch.testing.assert_close(per_token, expected_tokens, rtol=1e-12, atol=0)


def test_weight_overrides_the_schedule_and_maskable_defaults_to_everything():
    logits, x0, _, mask, t, ce = _hand_example()
    loss = dd.masked_diffusion_loss(
        logits, x0, mask, t, schedule=dd.CosineSchedule(), weight=torch.ones(2, dtype=torch.float64)
    )
    torch.testing.assert_close(loss, (ce * mask).sum() / 6, rtol=1e-12, atol=0)


def test_sequence_normalisation_skips_rows_without_maskable_tokens():
    logits, x0, maskable, mask, t, ce = _hand_example()
    maskable = maskable.clone()
    maskable[1] = False
    mask = mask & maskable
    loss = dd.masked_diffusion_loss(
        logits, x0, mask, t, schedule=dd.LinearSchedule(), maskable=maskable, normalize="sequence"
    )
    torch.testing.assert_close(loss, 2 * (ce[0, 1] + ce[0, 2]) / 2, rtol=1e-12, atol=0)
    empty = torch.zeros_like(mask)
    for normalize in ("token", "masked", "sequence"):
        zero = dd.masked_diffusion_loss(
            logits, x0, empty, t, schedule=dd.LinearSchedule(), normalize=normalize
        )
        assert float(zero) == 0.0


@pytest.mark.parametrize(
    "schedule", [dd.LinearSchedule(), dd.CosineSchedule(), dd.LogLinearSchedule(0.1)]
)
@pytest.mark.parametrize("antithetic", [True, False])
def test_context_free_denoiser_loss_equals_its_nll_in_expectation(schedule, antithetic, gen):
    """For a denoiser q that ignores its input, E[loss] = (alpha(eps) - alpha(1)) / (1 - eps) *
    mean_i -log q_i(x0_i) when t ~ U(eps, 1) (the weight integrates the masking probability).
    z-test over 20000 sequences, |z| < 4."""
    vocab, length, rows, eps = 6, 8, 20000, 1e-3
    q_logits = torch.randn(length, vocab + 1, generator=gen, dtype=torch.float64)
    q_logits[:, vocab] = -torch.inf  # never predicts the mask
    x0 = torch.randint(0, vocab, (length,), generator=gen).expand(rows, length)
    t = dd.sample_t(rows, eps=eps, antithetic=antithetic, generator=gen, dtype=torch.float64)
    _, mask = dd.corrupt(x0, t, mask_id=vocab, schedule=schedule, generator=gen)
    logits = q_logits.expand(rows, length, vocab + 1)
    per_token = dd.masked_diffusion_loss(logits, x0, mask, t, schedule=schedule, reduction="none")
    per_row = per_token.sum(1) / length
    nll = float(-q_logits.log_softmax(-1).gather(-1, x0[0, :, None]).mean())
    mass = float((schedule.alpha(eps) - schedule.alpha(1.0)) / (1 - eps))
    z = (float(per_row.mean()) - mass * nll) / (float(per_row.std()) / math.sqrt(rows))
    assert abs(z) < 4
    batch_loss = dd.masked_diffusion_loss(logits, x0, mask, t, schedule=schedule, normalize="token")
    torch.testing.assert_close(batch_loss, per_row.mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("schedule", [dd.LinearSchedule(), dd.CosineSchedule()])
def test_exact_nelbo_equals_minus_log_p_for_an_exact_denoiser(schedule, exact_denoiser):
    """Enumerate every mask S and integrate over t by Gauss-Legendre quadrature:
    NELBO(x) = int_0^1 sum_S P(S | t) loss(x, S, t) dt, with loss from masked_diffusion_loss and
    the exact conditionals of a Markov chain. For alpha(1) = 0 it equals -log p(x) for every x."""
    vocab, length = 3, 4
    model = exact_denoiser(vocab, length, seed=1)
    masks = torch.tensor(list(itertools.product([False, True], repeat=length)))  # (16, L)
    nodes, weights = np.polynomial.legendre.leggauss(48)
    t_nodes = torch.tensor(0.5 * (nodes + 1))
    for x in model.sequences[[0, 17, 40, 80]]:
        x0 = x.expand(len(masks), length)
        xt = torch.where(masks, torch.full_like(x0, vocab), x0)
        logits = model(xt)
        nelbo = 0.0
        for t_k, w_k in zip(t_nodes, 0.5 * weights):
            t = t_k.expand(len(masks))
            loss = dd.masked_diffusion_loss(
                logits, x0, masks, t, schedule=schedule, reduction="none"
            ).sum(1)
            p_mask = schedule.mask_prob(t_k)
            prob_s = p_mask ** masks.sum(1) * (1 - p_mask) ** (length - masks.sum(1))
            nelbo += w_k * float((prob_s * loss).sum())
        assert nelbo == pytest.approx(-float(model.log_prob(x[None])), abs=1e-9)


def test_loss_is_float32_for_bf16_logits_and_under_autocast(gen):
    logits = torch.randn(2, 5, 11, generator=gen).bfloat16().requires_grad_()
    x0 = torch.randint(0, 10, (2, 5), generator=gen)
    mask = torch.rand(2, 5, generator=gen) < 0.6
    mask[0, 0] = True
    t = torch.tensor([0.3, 0.9])
    s = dd.LinearSchedule()
    loss = dd.masked_diffusion_loss(logits, x0, mask, t, schedule=s)
    assert loss.dtype == torch.float32
    reference = dd.masked_diffusion_loss(logits.detach().float(), x0, mask, t, schedule=s)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16

    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_logits = head(hidden)
        auto_loss = dd.masked_diffusion_loss(auto_logits, x0, mask, t, schedule=s)
    assert auto_logits.dtype == torch.bfloat16 and auto_loss.dtype == torch.float32
    manual = dd.masked_diffusion_loss(auto_logits.float(), x0, mask, t, schedule=s)
    torch.testing.assert_close(auto_loss, manual, rtol=1e-6, atol=0)


@pytest.mark.parametrize("normalize", ["token", "masked", "sequence"])
def test_gradient_matches_finite_differences(normalize, gen):
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x0 = torch.randint(0, 5, (2, 4), generator=gen)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)

    def loss(z):
        return dd.masked_diffusion_loss(
            z, x0, mask, t, schedule=dd.CosineSchedule(), normalize=normalize
        )

    assert torch.autograd.gradcheck(loss, (logits,))


def test_loss_agrees_with_cross_entropy_on_a_full_mask(gen):
    logits = torch.randn(3, 6, 7, generator=gen)
    x0 = torch.randint(0, 7, (3, 6), generator=gen)
    mask = torch.ones(3, 6, dtype=torch.bool)
    t = torch.ones(3)
    loss = dd.masked_diffusion_loss(logits, x0, mask, t, schedule=dd.LinearSchedule())
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 7), x0.reshape(-1)))


def _args(**change):
    logits, x0, maskable, mask, t, _ = _hand_example()
    kwargs = dict(
        logits=logits, x0=x0, mask=mask, t=t, schedule=dd.LinearSchedule(), maskable=maskable
    )
    kwargs.update(change)
    return kwargs


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            dict(t=torch.tensor([0.0, 0.5], dtype=torch.float64)),
            ValueError,
            r"t must lie in \(0, 1\]",
        ),
        (
            dict(t=torch.tensor([1.5, 0.5], dtype=torch.float64)),
            ValueError,
            r"t must lie in \(0, 1\]",
        ),
        (dict(t=torch.tensor([0.5])), ValueError, "t must have shape"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "outside maskable"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
        (
            dict(x0=torch.tensor([[0, 1, 9], [3, 3, 1]])),
            ValueError,
            r"x0 at masked positions must lie in \[0, 4\)",
        ),
        (dict(x0=torch.zeros(2, 3)), TypeError, "x0 must be a long"),
        (dict(logits=torch.zeros(2, 3)), ValueError, "logits must have 3 dim"),
        (dict(normalize="batch"), ValueError, "normalize must be one of"),
        (dict(reduction="sum"), ValueError, "reduction must be one of"),
        (dict(weight=torch.ones(3)), ValueError, "weight must have shape"),
        (dict(schedule=None), TypeError, "schedule must be a Schedule"),
        (dict(mask_id=3), ValueError, "x0 contains mask_id=3 at a maskable position"),
    ],
)
def test_loss_rejects_bad_input(change, error, match):
    kwargs = _args(**change)
    with dd.debug_checks(), pytest.raises(error, match=match):  # value checks are opt-in
        dd.masked_diffusion_loss(
            kwargs.pop("logits"), kwargs.pop("x0"), kwargs.pop("mask"), kwargs.pop("t"), **kwargs
        )


def test_mask_id_check_ignores_positions_outside_maskable():
    kwargs = _args(mask_id=0)  # token 0 sits only at the unmaskable prompt position (0, 0)
    loss = dd.masked_diffusion_loss(
        kwargs.pop("logits"), kwargs.pop("x0"), kwargs.pop("mask"), kwargs.pop("t"), **kwargs
    )
    assert torch.isfinite(loss)
