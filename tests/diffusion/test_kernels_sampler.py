"""The fused sampler step: the Triton kernel (Triton's interpreter on CPU, fp32) against the
reference at temperature 0, confidences against their closed forms, chi-square tests of the
sampled tokens against softmax(z / T), and `generate` with the kernel and with a compiled step
(the dense path, run here through an identity compiler)."""

from __future__ import annotations

import pytest
import torch

import diffusion as dd
from diffusion.kernels import propose_reference
from diffusion.kernels.dispatch import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
MODES = ["low_confidence", "margin", "entropy", "random"]


def _block(seed=0, batch=3, length=9, vocab=70, dtype=torch.float32):
    """A strided (B, Lb, V) view into larger logits, as `generate` passes the block."""
    g = torch.Generator().manual_seed(seed)
    full = 3 * torch.randn(batch, length + 4, vocab, generator=g, dtype=dtype)
    candidates = torch.rand(batch, length, generator=g) < 0.7
    return full[:, 2 : 2 + length], candidates


def _triton(logits, candidates, **kwargs):
    from diffusion.kernels.triton_sampler import propose_triton

    block = dict(block_v=kwargs.pop("block_v", 16), block_r=kwargs.pop("block_r", 4))
    args = dict(mask_id=5, temperature=0.0, remasking="low_confidence", generator=None)
    args.update(kwargs)
    return propose_triton(
        logits,
        candidates,
        args["mask_id"],
        args["temperature"],
        args["remasking"],
        args["generator"],
        **block,
    )


def _closed_form(logits_rows, token, remasking, mask_id):
    """Confidences from their definitions, in float64, mask column excluded."""
    z = logits_rows.double().clone()
    z[:, mask_id] = -torch.inf
    p = z.softmax(-1)
    if remasking == "low_confidence":
        return p.gather(-1, token[:, None]).squeeze(-1)
    if remasking == "margin":
        top2 = p.topk(2, -1).values
        return top2[:, 0] - top2[:, 1]
    return torch.special.xlogy(p, p).sum(-1)


@needs_triton
@pytest.mark.parametrize("remasking", MODES)
@pytest.mark.parametrize("block_v", [16, 128])
def test_kernel_equals_reference_at_temperature_zero(remasking, block_v):
    logits, candidates = _block()
    ours = _triton(logits, candidates, remasking=remasking, block_v=block_v, block_r=4)
    ref = propose_reference(logits, candidates, 5, 0.0, remasking, None)
    assert torch.equal(ours.token, ref.token)
    assert bool(ours.finite.all()) and ours.confidence.dtype == torch.float64
    if remasking != "random":
        torch.testing.assert_close(ours.confidence, ref.confidence, rtol=2e-6, atol=1e-7)
        rows = logits[candidates]
        expected = _closed_form(rows, ours.token, remasking, 5)
        torch.testing.assert_close(ours.confidence, expected, rtol=2e-6, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_sampled_tokens_get_the_confidence_of_their_definition(remasking):
    logits, candidates = _block(seed=1)
    out = _triton(
        logits,
        candidates,
        remasking=remasking,
        temperature=1.3,
        generator=torch.Generator().manual_seed(0),
    )
    assert not bool((out.token == 5).any())  # never the mask token
    expected = _closed_form(logits[candidates], out.token, remasking, 5)
    torch.testing.assert_close(out.confidence, expected, rtol=2e-6, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("temperature", [0.6, 2.0])
def test_kernel_samples_follow_the_tempered_softmax(temperature, chi2_pvalue):
    """4096 draws over V = 24 tokens in 2 blocks of 16 (mask token 5 excluded): chi-square
    p > 1e-3 against softmax(z / T)."""
    vocab, rows = 24, 4096
    z = torch.linspace(-1.5, 1.5, vocab)[torch.randperm(vocab, generator=torch.Generator())]
    logits = z.expand(1, rows, vocab)
    out = _triton(
        logits,
        torch.ones(1, rows, dtype=torch.bool),
        temperature=temperature,
        generator=torch.Generator().manual_seed(7),
        block_v=16,
        block_r=1024,
    )
    keep = torch.arange(vocab) != 5
    counts = torch.bincount(out.token, minlength=vocab)
    assert int(counts[5]) == 0
    expected = torch.softmax(z[keep].double() / temperature, 0)
    assert chi2_pvalue(counts[keep], expected) > 1e-3


@needs_triton
def test_kernel_draws_are_reproducible_and_depend_on_the_seed():
    logits, candidates = _block(seed=2)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return _triton(logits, candidates, temperature=1.0, generator=generator).token

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


@needs_triton
def test_kernel_handles_impossible_tokens_and_flags_nan_rows():
    logits, candidates = _block(seed=3, vocab=40)
    logits = logits.clone()
    logits[..., :20] = -torch.inf  # a whole first block of impossible tokens
    for remasking in ["low_confidence", "entropy"]:
        out = _triton(logits, candidates, remasking=remasking, temperature=1.0)
        assert bool((out.token >= 20).all()) and bool(out.finite.all())
        expected = _closed_form(logits[candidates], out.token, remasking, 5)
        torch.testing.assert_close(out.confidence, expected, rtol=2e-6, atol=1e-7)
    logits[0, 0, 30] = torch.nan
    candidates[0, 0] = True
    out = _triton(logits, candidates)
    assert not bool(out.finite[0]) and bool(out.finite[1:].all())


# ------------------------------------------------------------------ generate


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = dd.Transformer(12, d_model=16, n_layers=1, n_heads=2, d_ff=16, max_seq_len=32)

    def forward(self, x, attention_mask=None):
        return 4 * self.net(x, attention_mask)  # sharper logits, fewer near-ties


@needs_triton
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_generate_with_the_kernel_equals_the_reference_when_greedy(remasking):
    model, prompt = _TinyModel(), torch.randint(0, 11, (2, 3), generator=torch.Generator())
    kwargs = dict(mask_id=11, gen_length=8, steps=4, block_length=4, remasking=remasking)
    ours = dd.generate(model, prompt, backend="triton", **kwargs)
    ref = dd.generate(model, prompt, backend="reference", **kwargs)
    assert torch.equal(ours, ref)


@needs_triton
def test_generate_with_the_kernel_raises_on_nan_logits():
    def model(x):
        out = torch.zeros(*x.shape, 6)
        out[..., 1] = torch.nan
        return out

    with pytest.raises(FloatingPointError, match="non-finite confidence at step 0"):
        dd.generate(model, torch.zeros(1, 2, dtype=torch.long), mask_id=5, gen_length=2,
                    steps=1, backend="triton")  # fmt: skip


def _identity(fn):
    return fn


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_dense_step_for_compilers_equals_the_eager_step_when_greedy(remasking, threshold):
    model, prompt = _TinyModel(), torch.randint(0, 11, (3, 2), generator=torch.Generator())
    kwargs = dict(
        mask_id=11,
        gen_length=8,
        steps=4,
        block_length=4,
        remasking=remasking,
        threshold=threshold,
        stop_at_eos=True,
        eos_id=10,
    )
    seen_eager, seen_dense = [], []
    ours = dd.generate(model, prompt, compiler=_identity, callback=seen_dense.append, **kwargs)
    ref = dd.generate(model, prompt, callback=seen_eager.append, **kwargs)
    assert torch.equal(ours, ref)
    for a, b in zip(seen_dense, seen_eager):
        assert torch.equal(a.committed, b.committed)
        torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-6, atol=1e-7)


def test_dense_step_samples_follow_the_tempered_softmax(chi2_pvalue):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7, 9.0])  # token 8 = mask

    def model(x):
        return logits.expand(*x.shape, 9)

    rows, temperature = 8000, 1.5
    out = dd.generate(
        model,
        torch.zeros(rows, 0, dtype=torch.long),
        mask_id=8,
        gen_length=1,
        steps=1,
        temperature=temperature,
        generator=torch.Generator().manual_seed(5),
        compiler=_identity,
    )
    counts = torch.bincount(out[:, 0], minlength=9)
    assert int(counts[8]) == 0
    expected = torch.softmax(logits[:8].double() / temperature, 0)
    assert chi2_pvalue(counts[:8], expected) > 1e-3


def test_dense_step_random_remasking_commits_uniformly_random_positions(chi2_pvalue):
    """Two commits per step among 4 positions: the first pair is uniform over the 6 pairs
    (chi-square, 3000 rows, p > 1e-3), and the second step commits exactly the other two."""

    def model(x):
        return torch.zeros(*x.shape, 3)

    seen = []
    dd.generate(
        model,
        torch.zeros(3000, 0, dtype=torch.long),
        mask_id=2,
        gen_length=4,
        steps=2,
        remasking="random",
        generator=torch.Generator().manual_seed(0),
        compiler=_identity,
        callback=seen.append,
    )
    first, second = seen[0].committed, seen[1].committed
    assert bool(first.sum(1).eq(2).all()) and bool((first ^ second).all())
    pair = (first.long() * torch.tensor([8, 4, 2, 1])).sum(1)  # a 4-bit code per pair
    codes = torch.tensor([3, 5, 6, 9, 10, 12])
    counts = (pair[:, None] == codes).sum(0)
    assert int(counts.sum()) == 3000
    assert chi2_pvalue(counts, torch.full((6,), 1 / 6)) > 1e-3


def test_dense_step_reports_non_finite_logits():
    def model(x):
        out = torch.zeros(*x.shape, 6)
        out[..., 1] = torch.nan
        return out

    with pytest.raises(FloatingPointError, match="non-finite confidence at step 0"):
        dd.generate(model, torch.zeros(1, 2, dtype=torch.long), mask_id=5, gen_length=2,
                    steps=1, compiler=_identity)  # fmt: skip


def test_generate_rejects_bad_backend_and_compiler():
    args = (lambda x: torch.zeros(*x.shape, 4), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="backend must be one of"):
        dd.generate(*args, mask_id=3, gen_length=2, steps=2, backend="cuda")
    with pytest.raises(TypeError, match="compiler must be None or callable"):
        dd.generate(*args, mask_id=3, gen_length=2, steps=2, compiler="inductor")


# ------------------------------------------------------------------ CUDA (bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_cuda_kernel_on_bf16_logits_matches_the_reference(remasking):
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 64, 126_464, device="cuda")).bfloat16()
    candidates = torch.rand(4, 64, device="cuda") < 0.5
    ours = dd.kernels.propose(
        logits, candidates, mask_id=126_336, temperature=0.0, remasking=remasking,
        backend="triton",
    )  # fmt: skip
    ref = propose_reference(logits, candidates, 126_336, 0.0, remasking, None)
    assert torch.equal(ours.token, ref.token)
    torch.testing.assert_close(ours.confidence, ref.confidence, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_cuda_kernel_samples_follow_the_tempered_softmax(chi2_pvalue):
    vocab, rows = 64, 200_000
    z = torch.linspace(-2, 2, vocab, device="cuda")
    out = dd.kernels.propose(
        z.expand(1, rows, vocab).bfloat16(), torch.ones(1, rows, dtype=torch.bool, device="cuda"),
        mask_id=0, temperature=0.8, remasking="low_confidence",
        generator=torch.Generator(device="cuda").manual_seed(0), backend="triton",
    )  # fmt: skip
    counts = torch.bincount(out.token, minlength=vocab).cpu()
    assert int(counts[0]) == 0
    expected = torch.softmax(z[1:].bfloat16().double().cpu() / 0.8, 0)
    assert chi2_pvalue(counts[1:], expected) > 1e-3


def test_the_shared_confidence_formula_matches_the_softmax_definitions():
    from diffusion.kernels.proposal import confidence_of

    z = torch.randn(5, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = torch.softmax(z, -1)
    top, picked = z.max(-1)
    probs, total = (z - top[:, None]).exp(), (z - top[:, None]).exp().sum(-1)
    args = (z.gather(-1, picked[:, None]).squeeze(-1), top, probs, total)
    torch.testing.assert_close(confidence_of(*args, "low_confidence"), p.max(-1).values)
    two = p.topk(2, -1).values
    torch.testing.assert_close(confidence_of(*args, "margin"), two[:, 0] - two[:, 1])
    torch.testing.assert_close(confidence_of(*args, "entropy"), (p * p.log()).sum(-1))
    with pytest.raises(ValueError, match="random"):
        confidence_of(*args, "random")
