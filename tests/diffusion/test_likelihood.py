"""LLaDA's Monte-Carlo ELBO: exactness, unbiasedness, stratification, and multiple choice."""

from __future__ import annotations

import math

import pytest
import torch

import diffusion as dd

VOCAB = 5
MASK = VOCAB  # logits have VOCAB + 1 columns; the last one is the mask token


def _z_test(estimates: torch.Tensor, expected: float) -> float:
    return (float(estimates.mean()) - expected) / (
        float(estimates.std()) / math.sqrt(len(estimates))
    )


def test_uniform_denoiser_gives_the_exact_value_for_any_sample(fixed_logits_model, gen):
    """CE = log V at every masked position, so each sample is (R/l) * l * log V = R log V."""
    model = fixed_logits_model(torch.zeros(16, VOCAB + 1, dtype=torch.float64))
    prompt = torch.randint(0, VOCAB, (3, 4), generator=gen)
    response = torch.randint(0, VOCAB, (3, 7), generator=gen)
    ll = dd.elbo_log_likelihood(
        model, prompt, response, mask_id=MASK, mc_num=10, batch_size=4, generator=gen
    )
    assert ll.dtype == torch.float64 and ll.shape == (3,)
    torch.testing.assert_close(ll, torch.full((3,), -7 * math.log(VOCAB + 1), dtype=torch.float64))
    assert model.calls == 3  # ceil(10 / 4) forward passes


def test_estimator_is_unbiased_for_a_context_free_denoiser(fixed_logits_model, gen):
    """E[(R/l) sum_{i in S} CE_i] = sum_i CE_i: z-test over 2000 independent rows, |z| < 4."""
    length_prompt, length_response, rows = 3, 6, 2000
    q = torch.randn(length_prompt + length_response, VOCAB + 1, generator=gen, dtype=torch.float64)
    q[:, MASK] = -torch.inf
    model = fixed_logits_model(q)
    prompt = torch.randint(0, VOCAB, (1, length_prompt), generator=gen).expand(rows, -1)
    response = torch.randint(0, VOCAB, (1, length_response), generator=gen).expand(rows, -1)
    ll = dd.elbo_log_likelihood(
        model, prompt, response, mask_id=MASK, mc_num=2, batch_size=2, generator=gen
    )
    exact = float(q[length_prompt:].log_softmax(-1).gather(-1, response[0, :, None]).sum())
    assert abs(_z_test(ll, exact)) < 4
    assert float(ll.std()) > 0  # the check above is not trivially satisfied


def test_estimator_is_unbiased_for_an_exact_denoiser(exact_denoiser, gen):
    """For exact conditionals the ELBO equals log p(response | prompt) (any-order AR identity)."""
    model = exact_denoiser(vocab=3, length=4, seed=2)
    x = model.sequences[[29]]  # one sequence; prompt = its first token
    prompt, response = x[:, :1], x[:, 1:]
    log_joint = float(model.log_prob(x))
    first = model.sequences[:, 0] == x[0, 0]
    log_prompt = float(model.probs[first].sum().log())
    rows = 600
    ll = dd.elbo_log_likelihood(
        model,
        prompt.expand(rows, -1),
        response.expand(rows, -1),
        mask_id=model.mask_id,
        mc_num=3,
        batch_size=3,
        generator=gen,
    )
    assert abs(_z_test(ll, log_joint - log_prompt)) < 4


class _Spy:
    """Context-free model that records the inputs and attention masks it receives."""

    def __init__(self):
        self.inputs, self.masks = [], []

    def __call__(self, x, attention_mask=None):
        self.inputs.append(x.clone())
        self.masks.append(attention_mask)
        return torch.zeros(*x.shape, VOCAB + 1)


def test_masks_exactly_l_response_tokens_with_stratified_l(gen):
    spy = _Spy()
    prompt = torch.randint(0, VOCAB, (2, 3), generator=gen)
    response = torch.randint(0, VOCAB, (2, 8), generator=gen)
    dd.elbo_log_likelihood(
        spy, prompt, response, mask_id=MASK, mc_num=24, batch_size=8, generator=gen
    )
    assert len(spy.inputs) == 3
    for x in spy.inputs:
        x = x.view(2, 8, 11)  # (rows, samples, P + R)
        assert bool((x[:, :, :3] == prompt[:, None]).all()), "the prompt was masked"
        visible = x[:, :, 3:] != MASK
        assert bool((x[:, :, 3:][visible] == response[:, None].expand_as(visible)[visible]).all())
        counts = (~visible).sum(-1)  # (rows, samples)
        # n = R = 8 samples per batch: the stratified grid visits every l in 1..8 exactly once.
        assert torch.equal(counts.sort(-1).values, torch.arange(1, 9).expand(2, 8))


def test_stratified_l_is_marginally_uniform(gen, chi2_pvalue):
    spy = _Spy()
    rows, length = 3000, 5
    prompt = torch.zeros(rows, 0, dtype=torch.long)
    response = torch.randint(0, VOCAB, (rows, length), generator=gen)
    dd.elbo_log_likelihood(
        spy, prompt, response, mask_id=MASK, mc_num=2, batch_size=2, generator=gen
    )
    counts = (spy.inputs[0] == MASK).sum(-1).view(rows, 2)
    for sample in range(2):
        observed = torch.bincount(counts[:, sample] - 1, minlength=length)
        assert chi2_pvalue(observed, torch.full((length,), 1 / length)) > 1e-3


def test_left_padded_prompts_pass_the_full_attention_mask(gen):
    spy = _Spy()
    prompt = torch.randint(0, VOCAB, (2, 4), generator=gen)
    attention_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    dd.elbo_log_likelihood(
        spy,
        prompt,
        prompt[:, :2],
        mask_id=MASK,
        mc_num=3,
        batch_size=3,
        attention_mask=attention_mask,
    )
    (mask,) = spy.masks
    expected = torch.cat([attention_mask, torch.ones(2, 2, dtype=torch.bool)], 1).repeat_interleave(
        3, 0
    )
    assert torch.equal(mask, expected)


def test_choose_picks_the_most_likely_candidate_with_common_random_numbers(fixed_logits_model, gen):
    q = torch.full((6, VOCAB + 1), -3.0, dtype=torch.float64)
    q[:, 2] = 3.0  # the model believes every position holds token 2
    model = fixed_logits_model(q)
    prompt = torch.tensor([1, 0, 4])
    candidates = [torch.tensor([0, 1, 3]), torch.tensor([2, 2, 2]), torch.tensor([2, 2, 1])]
    index, scores = dd.choose(
        model,
        prompt,
        candidates,
        mask_id=MASK,
        mc_num=8,
        batch_size=4,
        generator=gen,
        return_scores=True,
    )
    assert index == 1 and scores.shape == (3,)
    assert float(scores[1]) > float(scores[2]) > float(scores[0])
    seeded = torch.Generator().manual_seed(5)
    alone = dd.elbo_log_likelihood(
        model,
        prompt[None],
        candidates[2][None],
        mask_id=MASK,
        mc_num=8,
        batch_size=4,
        generator=seeded,
    )
    _, again = dd.choose(
        model,
        prompt,
        candidates,
        mask_id=MASK,
        mc_num=8,
        batch_size=4,
        generator=torch.Generator().manual_seed(5),
        return_scores=True,
    )
    assert float(again[2]) == float(alone[0])
    assert dd.choose(model, prompt[None], candidates, mask_id=MASK, mc_num=4) == 1


@pytest.mark.parametrize(
    ("prompt", "response", "kwargs", "error", "match"),
    [
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.full((2, 2), MASK),
            {},
            ValueError,
            "must not contain mask_id",
        ),
        (
            torch.full((2, 3), MASK),
            torch.zeros(2, 2, dtype=torch.long),
            {},
            ValueError,
            "must not contain mask_id",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(3, 2, dtype=torch.long),
            {},
            ValueError,
            "response must have shape",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 0, dtype=torch.long),
            {},
            ValueError,
            "R >= 1",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            dict(mc_num=0),
            ValueError,
            "mc_num",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            dict(batch_size=0),
            ValueError,
            "batch_size",
        ),
        (
            torch.zeros(2, 3),
            torch.zeros(2, 2, dtype=torch.long),
            {},
            TypeError,
            "prompt must be a long",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            dict(attention_mask=torch.ones(2, 2, dtype=torch.bool)),
            ValueError,
            "attention_mask must have shape",
        ),
    ],
)
def test_elbo_rejects_bad_input(prompt, response, kwargs, error, match):
    with pytest.raises(error, match=match):
        dd.elbo_log_likelihood(_Spy(), prompt, response, mask_id=MASK, **kwargs)


def test_elbo_rejects_a_model_with_the_wrong_output_shape():
    with pytest.raises(ValueError, match="model must return logits"):
        dd.elbo_log_likelihood(
            lambda x: torch.zeros(x.shape[0], VOCAB + 1),
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.long),
            mask_id=MASK,
        )


@pytest.mark.parametrize(
    ("candidates", "match"),
    [
        ([], "non-empty"),
        (torch.zeros(2, 3, dtype=torch.long), "non-empty"),
        ([torch.zeros(1, 2)], r"candidates\[0\]"),
    ],
)
def test_choose_rejects_bad_candidates(candidates, match):
    with pytest.raises(ValueError, match=match):
        dd.choose(_Spy(), torch.zeros(3, dtype=torch.long), candidates, mask_id=MASK)
