"""Shared oracles for the diffusion tests: analytic denoisers and a chi-square p-value.

They are fixtures (not an importable helper module) so that the tests import the same way under
pytest's prepend and importlib import modes.
"""

from __future__ import annotations

import itertools

import pytest
import torch


def _chi2_pvalue(observed, expected_probs) -> float:
    """P(chi2_{k-1} >= X^2) for counts (k,) against cell probabilities (k,), via gammaincc."""
    observed = torch.as_tensor(observed, dtype=torch.float64)
    expected = torch.as_tensor(expected_probs, dtype=torch.float64) * observed.sum()
    assert bool((expected >= 5).all()), "chi-square needs >= 5 expected counts per cell"
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2)
    )


@pytest.fixture
def chi2_pvalue():
    return _chi2_pvalue


class FixedLogits:
    """A context-free denoiser: the same logits (L, V) for every input row; counts its calls."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.calls = 0

    def __call__(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        self.calls += 1
        batch, length = x.shape
        return self.logits[-length:].expand(batch, length, self.logits.shape[-1]).clone()


@pytest.fixture
def fixed_logits_model():
    return FixedLogits


class ExactDenoiser:
    """Exact conditionals of an enumerated joint p over {0..V-1}^L, with mask token id V.

    For a partially masked x, the logits at position i are log p(x_i = v | the unmasked tokens of
    x) for v < V (computed by summing p over the consistent sequences), and -inf for the mask.
    Rows that no sequence explains get a uniform posterior (never used by the tests).
    """

    def __init__(self, probs: torch.Tensor, vocab: int, length: int):
        self.vocab, self.length = vocab, length
        self.sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
        self.probs = probs.to(torch.float64)  # (V**L,)
        self.mask_id = vocab

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for complete sequences x (B, L)."""
        index = (x * self.vocab ** torch.arange(self.length - 1, -1, -1)).sum(-1)
        return self.probs[index].log()

    def __call__(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        visible = x != self.mask_id  # (B, L)
        agrees = (self.sequences[None] == x[:, None]) | ~visible[:, None]  # (B, N, L)
        weights = self.probs[None] * agrees.all(-1)  # (B, N)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-300)
        one_hot = torch.nn.functional.one_hot(self.sequences, self.vocab).to(torch.float64)
        marginals = torch.einsum("bn,nlv->blv", weights, one_hot)  # (B, L, V)
        logits = marginals.log()
        mask_column = torch.full((*x.shape, 1), -torch.inf, dtype=torch.float64)
        return torch.cat([logits, mask_column], dim=-1)


def _markov_joint(vocab: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """A random first-order Markov chain's probabilities over all V**L sequences (product order)."""
    g = torch.Generator().manual_seed(seed)
    initial = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64), 0)
    transition = torch.softmax(2 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), 1)
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    logp = initial[sequences[:, 0]].log()
    for i in range(1, length):
        logp = logp + transition[sequences[:, i - 1], sequences[:, i]].log()
    return logp.exp()


@pytest.fixture
def exact_denoiser():
    """Factory: exact_denoiser(vocab, length, seed) -> ExactDenoiser of a random Markov chain."""

    def make(vocab: int = 3, length: int = 4, seed: int = 0) -> ExactDenoiser:
        return ExactDenoiser(_markov_joint(vocab, length, seed=seed), vocab, length)

    return make
