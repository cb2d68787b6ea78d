"""Samplers: invariants for every mode, commit schedules, threshold rule, Gumbel sampling
(chi-square), greedy exactness, batch invariance, EOS stop, callback and stats contents."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

import diffusion as dd

VOCAB = 8
MASK = VOCAB  # models below output VOCAB + 1 logits; the last column is the mask token
EOS = 7


class RowLogits:
    """Context-free model with fixed logits per row: (B, G, V+1) for the generated positions."""

    def __init__(self, logits):
        self.logits = logits
        self.calls = 0

    def __call__(self, x, attention_mask=None):
        self.calls += 1
        batch, length = x.shape
        gen = self.logits.shape[1]
        prompt_part = torch.zeros(
            batch, length - gen, self.logits.shape[-1], dtype=self.logits.dtype
        )
        return torch.cat([prompt_part, self.logits.expand(batch, -1, -1)], dim=1)


def _peaked(targets, confidences, vocab=VOCAB):
    """(G, V+1) logits whose softmax over the real tokens puts `confidence` on `target`."""
    logits = torch.full((len(targets), vocab + 1), -torch.inf, dtype=torch.float64)
    for i, (target, conf) in enumerate(zip(targets, confidences)):
        rest = (1 - conf) / (vocab - 1)
        logits[i, :vocab] = torch.log(torch.tensor(rest, dtype=torch.float64))
        logits[i, target] = torch.log(torch.tensor(conf, dtype=torch.float64))
    logits[:, MASK] = 30.0  # the model loves the mask token: it must still never be proposed
    return logits


def _tiny_transformer(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = dd.Transformer(VOCAB + 1, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
    return model.to(dtype).eval()


class MaskLover(torch.nn.Module):
    """A random transformer whose mask logit is boosted: proposals must still avoid it."""

    def __init__(self):
        super().__init__()
        self.inner = _tiny_transformer()

    def forward(self, x, attention_mask=None):
        logits = self.inner(x, attention_mask)
        return logits + 20.0 * torch.nn.functional.one_hot(torch.tensor(MASK), VOCAB + 1)


class Tracker:
    """Callback that checks the step-by-step invariants and records the StepInfos."""

    def __init__(self, prompt_length, gen_length, block_length):
        self.prompt_length, self.block_length = prompt_length, block_length
        self.previous = None
        self.infos = []

    def __call__(self, info):
        tokens, committed = info.tokens, info.committed
        if self.previous is not None:
            assert torch.equal(tokens, self.previous), "tokens changed outside the commits"
        candidates = tokens == MASK
        assert not bool((committed & ~candidates).any()), "committed a position that was not masked"
        lo = self.prompt_length + info.block * self.block_length
        outside = torch.ones_like(committed)
        outside[:, lo : lo + self.block_length] = False
        assert not bool((committed & outside).any()), "committed outside the current block"
        has_candidates = (candidates & ~outside).any(1)
        assert bool((committed.sum(1)[has_candidates] >= 1).all()), "a step committed nothing"
        assert not bool((info.predicted[committed] == MASK).any()), "proposed the mask token"
        assert bool(torch.isinf(info.confidence[~candidates | outside]).all())
        self.previous = torch.where(committed, info.predicted, tokens)
        self.infos.append(info)


MODES = list(
    itertools.product(
        ["low_confidence", "random", "margin", "entropy"], [None, 0.2], [0.0, 1.0], [None, 4]
    )
)


@pytest.mark.parametrize(("remasking", "threshold", "temperature", "block_length"), MODES)
def test_sampler_invariants(remasking, threshold, temperature, block_length, gen):
    """Prompt and committed tokens never change, commits stay in the block, no mask is proposed
    or left, every step commits at least one token per unfinished row."""
    model = MaskLover()
    prompt = torch.randint(0, VOCAB, (3, 5), generator=gen)
    tracker = Tracker(5, 8, block_length or 8)
    out, stats = dd.generate(
        model,
        prompt,
        mask_id=MASK,
        gen_length=8,
        steps=4,
        block_length=block_length,
        remasking=remasking,
        temperature=temperature,
        threshold=threshold,
        generator=gen,
        callback=tracker,
        return_stats=True,
    )
    assert out.shape == (3, 13) and torch.equal(out[:, :5], prompt)
    assert not bool((out == MASK).any())
    assert torch.equal(out, tracker.previous)
    assert stats.model_calls == len(tracker.infos)
    assert stats.committed_per_step.sum(0).tolist() == [8, 8, 8]
    if threshold is None:
        assert stats.model_calls == 4


@pytest.mark.parametrize(
    ("gen_length", "block_length", "steps", "per_step"),
    [
        (10, None, 3, [4, 3, 3]),
        (12, 6, 4, [3, 3, 3, 3]),
        (12, 6, 6, [2, 2, 2, 2, 2, 2]),
        (7, 7, 7, [1] * 7),
        (9, 3, 6, [2, 1, 2, 1, 2, 1]),
    ],
)
def test_fixed_count_schedule_is_observed(gen_length, block_length, steps, per_step, gen):
    model = _tiny_transformer()
    prompt = torch.randint(0, VOCAB, (2, 3), generator=gen)
    _, stats = dd.generate(
        model,
        prompt,
        mask_id=MASK,
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        return_stats=True,
    )
    assert stats.model_calls == steps
    assert stats.committed_per_step.tolist() == [[n, n] for n in per_step]


def test_transfer_schedule_is_llada_front_loaded():
    assert dd.transfer_schedule(10, 4).tolist() == [3, 3, 2, 2]
    counts = dd.transfer_schedule(torch.tensor([0, 5, 17]), 5)
    assert counts.tolist() == [[0] * 5, [1] * 5, [4, 4, 3, 3, 3]]
    for m, s in itertools.product(range(0, 30), range(1, 9)):
        schedule = dd.transfer_schedule(m, s)
        assert int(schedule.sum()) == m and int(schedule.max() - schedule.min()) <= 1
        assert bool((schedule.diff() <= 0).all())
    with pytest.raises(ValueError, match="num_masked"):
        dd.transfer_schedule(-1, 3)
    with pytest.raises(ValueError, match="steps"):
        dd.transfer_schedule(3, 0)


def test_threshold_commits_confident_tokens_plus_one_forced():
    confidences = [0.95, 0.3, 0.9, 0.5, 0.85, 0.2]
    targets = [1, 2, 3, 4, 5, 6]
    model = RowLogits(_peaked(targets, confidences)[None])
    seen = []
    out, stats = dd.generate(
        model,
        torch.zeros(1, 2, dtype=torch.long),
        mask_id=MASK,
        gen_length=6,
        steps=6,
        threshold=0.8,
        callback=seen.append,
        return_stats=True,
    )
    assert out[0, 2:].tolist() == targets
    # step 0: the three proposals above 0.8; then one forced commit per call, most confident first.
    assert stats.committed_per_step[:, 0].tolist() == [3, 1, 1, 1]
    assert stats.model_calls == 4 and stats.tokens_per_call == pytest.approx(1.5)
    for info in seen:
        conf = info.confidence[info.committed]
        best = float(info.confidence.max())
        assert bool(((conf > 0.8) | (conf == best)).all())
    order = [int(info.committed[0].nonzero()[0]) - 2 for info in seen[1:]]
    assert order == [3, 1, 5]


def test_threshold_steps_only_need_to_divide_into_blocks():
    model = RowLogits(_peaked([1] * 8, [0.99] * 8)[None])
    _, stats = dd.generate(
        model,
        torch.zeros(1, 1, dtype=torch.long),
        mask_id=MASK,
        gen_length=8,
        block_length=4,
        steps=2,
        threshold=0.9,
        return_stats=True,
    )
    assert stats.committed_per_step[:, 0].tolist() == [4, 4]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_the_tempered_softmax(temperature, gen, chi2_pvalue):
    """Chi-square over V = 8 tokens, 20000 draws, p > 1e-3; the mask column is ignored."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7, 9.0]], dtype=torch.float64)
    model = RowLogits(logits[None])
    rows = 20000
    out = dd.generate(
        model,
        torch.zeros(rows, 0, dtype=torch.long),
        mask_id=MASK,
        gen_length=1,
        steps=1,
        temperature=temperature,
        generator=gen,
    )
    counts = torch.bincount(out[:, 0], minlength=VOCAB + 1)
    assert int(counts[MASK]) == 0
    expected = torch.softmax(logits[0, :VOCAB] / temperature, 0)
    assert chi2_pvalue(counts[:VOCAB], expected) > 1e-3


def test_random_order_one_token_per_step_samples_the_joint_exactly(
    exact_denoiser, gen, chi2_pvalue
):
    """With exact conditionals, revealing one uniformly random position per step at T = 1 is
    ancestral sampling in a random order: the samples follow p(x) exactly (chi-square over the
    81 sequences, cells with < 5 expected merged, 20000 draws, p > 1e-3)."""
    model = exact_denoiser(vocab=3, length=4, seed=4)
    rows = 20000
    out = dd.generate(
        model,
        torch.zeros(rows, 0, dtype=torch.long),
        mask_id=model.mask_id,
        gen_length=4,
        steps=4,
        remasking="random",
        temperature=1.0,
        generator=gen,
    )
    index = (out * 3 ** torch.arange(3, -1, -1)).sum(-1)
    counts = torch.bincount(index, minlength=81).double()
    large = model.probs * rows >= 5
    observed = torch.cat([counts[large], counts[~large].sum()[None]])
    expected = torch.cat([model.probs[large], model.probs[~large].sum()[None]])
    if float(expected[-1]) * rows < 5:  # nothing (or too little) to merge: drop the extra cell
        observed, expected = counts[large], model.probs[large] / model.probs[large].sum()
    assert chi2_pvalue(observed, expected) > 1e-3


def test_temperature_zero_is_argmax_for_any_seed():
    logits = torch.randn(1, 6, VOCAB + 1, dtype=torch.float64)
    logits[..., MASK] = 50.0
    expected = logits[0, :, :VOCAB].argmax(-1)
    for seed in range(3):
        out = dd.generate(
            RowLogits(logits),
            torch.zeros(2, 1, dtype=torch.long),
            mask_id=MASK,
            gen_length=6,
            steps=3,
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(out[:, 1:], expected.expand(2, -1))


def test_huge_logits_do_not_overflow(gen):
    logits = 1e4 * torch.randn(1, 5, VOCAB + 1, generator=gen)
    logits[..., MASK] = -1e4
    out = dd.generate(
        RowLogits(logits),
        torch.zeros(4, 0, dtype=torch.long),
        mask_id=MASK,
        gen_length=5,
        steps=5,
        temperature=1.0,
        generator=gen,
    )
    assert torch.equal(out, logits[0, :, :VOCAB].argmax(-1).expand(4, -1))


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
def test_confidences_follow_their_definitions(remasking, gen):
    logits = torch.randn(2, 6, VOCAB + 1, generator=gen, dtype=torch.float64)
    seen = []
    dd.generate(
        RowLogits(logits),
        torch.zeros(2, 0, dtype=torch.long),
        mask_id=MASK,
        gen_length=6,
        steps=3,
        remasking=remasking,
        temperature=2.0,
        generator=gen,
        callback=seen.append,
    )
    probs = torch.softmax(logits[..., :VOCAB], -1)  # untempered, mask excluded
    info = seen[0]
    conf = info.confidence
    if remasking == "low_confidence":
        expected = probs.gather(-1, info.predicted[..., None]).squeeze(-1)
    elif remasking == "margin":
        top2 = probs.topk(2, -1).values
        expected = top2[..., 0] - top2[..., 1]
    elif remasking == "entropy":
        expected = (probs * probs.log()).sum(-1)
    else:
        assert bool(((conf >= 0) & (conf < 1)).all())
        return
    torch.testing.assert_close(conf, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
@pytest.mark.parametrize("block_length", [None, 3])
def test_a_model_that_always_predicts_a_target_is_reproduced_exactly(remasking, block_length, gen):
    target = torch.randint(0, VOCAB, (2, 6), generator=gen)
    logits = torch.full((2, 6, VOCAB + 1), -5.0)
    logits.scatter_(-1, target[..., None], 5.0)
    out = dd.generate(
        RowLogits(logits),
        torch.zeros(2, 2, dtype=torch.long),
        mask_id=MASK,
        gen_length=6,
        steps=6,
        block_length=block_length,
        remasking=remasking,
        generator=gen,
    )
    assert torch.equal(out[:, 2:], target)


def test_batch_invariance_with_left_padding():
    """A prompt decoded alone equals it inside a left-padded batch (greedy, float64 model)."""
    model = _tiny_transformer(torch.float64, seed=3)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (2, 5, 3)]
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), EOS)
    attention_mask = torch.zeros(3, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = p
        attention_mask[i, width - len(p) :] = True
    kwargs = dict(mask_id=MASK, gen_length=8, steps=8, block_length=4)
    together = dd.generate(model, batch, attention_mask=attention_mask, **kwargs)
    for i, p in enumerate(prompts):
        alone = dd.generate(model, p[None], **kwargs)
        assert torch.equal(together[i, width:], alone[0, len(p) :])
    # Control: the check can fail. Ignoring the padding changes the padded rows' outputs.
    unmasked = dd.generate(model, batch, **kwargs)
    assert not torch.equal(unmasked[:2, width:], together[:2, width:])


def test_attention_mask_is_passed_with_the_generated_part_set():
    received = []

    def model(x, attention_mask=None):
        received.append(attention_mask)
        return torch.zeros(*x.shape, VOCAB + 1)

    mask = torch.tensor([[False, True], [True, True]])
    dd.generate(
        model,
        torch.ones(2, 2, dtype=torch.long),
        mask_id=MASK,
        gen_length=3,
        steps=1,
        attention_mask=mask,
    )
    assert torch.equal(received[0], torch.tensor([[False, True, True, True, True], [True] * 5]))
    dd.generate(model, torch.ones(2, 2, dtype=torch.long), mask_id=MASK, gen_length=3, steps=1)
    assert received[1] is None


def test_stop_at_eos_finishes_rows_and_counts_calls_honestly():
    # Row 0 commits, by confidence: position 5, then 0, 1, then EOS at 2: it is then finished and
    # everything after its EOS (including the committed position 5) becomes EOS.
    row0 = _peaked([1, 2, EOS, 3, 4, 5, 6, 1], [0.97, 0.96, 0.95, 0.2, 0.2, 0.99, 0.2, 0.2])
    row1 = _peaked([1, 2, 3, 4, 5, 6, 1, 2], [0.9] * 8)
    model = RowLogits(torch.stack([row0, row1]))
    seen = []
    out, stats = dd.generate(
        model,
        torch.zeros(2, 1, dtype=torch.long),
        mask_id=MASK,
        gen_length=8,
        steps=8,
        eos_id=EOS,
        stop_at_eos=True,
        callback=seen.append,
        return_stats=True,
    )
    assert out[0, 1:].tolist() == [1, 2, EOS, EOS, EOS, EOS, EOS, EOS]
    assert out[1, 1:].tolist() == [1, 2, 3, 4, 5, 6, 1, 2]
    assert stats.model_calls == 8
    assert stats.committed_per_step[:, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert not bool((seen[4].committed[0]).any())

    solo, solo_stats = dd.generate(
        RowLogits(row0[None]),
        torch.zeros(1, 1, dtype=torch.long),
        mask_id=MASK,
        gen_length=8,
        steps=8,
        eos_id=EOS,
        stop_at_eos=True,
        return_stats=True,
    )
    assert torch.equal(solo, out[:1]) and solo_stats.model_calls == 4  # no call after the stop


def test_eos_with_a_mask_before_it_does_not_finish_the_row():
    # Commit order by confidence: EOS at position 2, then 3, then 0, then 1.
    logits = _peaked([1, 2, EOS, 3], [0.5, 0.3, 0.99, 0.98])
    seen = []
    out, stats = dd.generate(
        RowLogits(logits[None]),
        torch.zeros(1, 0, dtype=torch.long),
        mask_id=MASK,
        gen_length=4,
        steps=4,
        eos_id=EOS,
        stop_at_eos=True,
        callback=seen.append,
        return_stats=True,
    )
    # After the EOS commit, positions 0 and 1 are still masked: the row goes on (no EOS filling)
    # and position 3 is committed normally.
    assert seen[1].tokens[0].tolist() == [MASK, MASK, EOS, MASK]
    assert seen[2].tokens[0].tolist() == [MASK, MASK, EOS, 3]
    # Once everything before the EOS is committed the row is finished: what follows becomes EOS.
    assert out[0].tolist() == [1, 2, EOS, EOS] and stats.model_calls == 4


def test_callback_reports_the_logits_and_tokens_of_each_step(gen):
    model = _tiny_transformer()
    outputs = []

    def recording_model(x):
        outputs.append((x.clone(), model(x)))
        return outputs[-1][1]

    seen = []
    out = dd.generate(
        recording_model,
        torch.randint(0, VOCAB, (2, 3), generator=gen),
        mask_id=MASK,
        gen_length=6,
        steps=6,
        block_length=3,
        callback=seen.append,
    )
    assert [(i.step, i.block, i.block_step) for i in seen] == [(k, k // 3, k % 3) for k in range(6)]
    for info, (x, logits) in zip(seen, outputs):
        assert info.logits is logits and torch.equal(info.tokens, x)
        assert info.committed.sum(1).tolist() == [1, 1]
    assert torch.equal(torch.where(seen[-1].committed, seen[-1].predicted, seen[-1].tokens), out)


def test_generation_is_deterministic_under_a_generator():
    model = _tiny_transformer()
    prompt = torch.randint(0, VOCAB, (2, 3))
    runs = [
        dd.generate(
            model,
            prompt,
            mask_id=MASK,
            gen_length=6,
            steps=3,
            remasking="random",
            temperature=1.0,
            generator=torch.Generator().manual_seed(4),
        )
        for _ in range(2)
    ]
    assert torch.equal(*runs)


def test_accepts_models_returning_an_object_with_logits():
    model = _tiny_transformer()
    out = dd.generate(
        lambda x: SimpleNamespace(logits=model(x)),
        torch.zeros(1, 2, dtype=torch.long),
        mask_id=MASK,
        gen_length=4,
        steps=2,
    )
    assert out.shape == (1, 6) and not bool((out == MASK).any())


def test_non_finite_logits_raise():
    logits = torch.zeros(1, 3, VOCAB + 1)
    logits[0, 1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        dd.generate(
            RowLogits(logits),
            torch.zeros(1, 0, dtype=torch.long),
            mask_id=MASK,
            gen_length=3,
            steps=3,
        )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(gen_length=10, block_length=4), ValueError, "multiple of block_length"),
        (
            dict(gen_length=8, block_length=4, steps=3),
            ValueError,
            "multiple of the number of blocks",
        ),
        (dict(gen_length=4, steps=8), ValueError, "steps per block"),
        (dict(gen_length=0), ValueError, "gen_length must be >= 1"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(steps=2.0), TypeError, "steps must be an int"),
        (dict(remasking="topk"), ValueError, "remasking must be one of"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(threshold="0.9"), TypeError, "threshold"),
        (dict(threshold=float("nan")), ValueError, "threshold"),
        (dict(prompt=torch.full((2, 3), MASK)), ValueError, "prompt contains mask_id"),
        (dict(prompt=torch.zeros(3, dtype=torch.long)), ValueError, "prompt must have 2 dim"),
        (dict(prompt=torch.zeros(2, 3)), TypeError, "prompt must be a long"),
        (dict(mask_id=VOCAB + 1), ValueError, "mask_id=9 must be a token"),
        (
            dict(attention_mask=torch.ones(2, 2, dtype=torch.bool)),
            ValueError,
            "attention_mask must have shape",
        ),
        (dict(attention_mask=torch.tensor([[True, False, True]] * 2)), ValueError, "LEFT padding"),
        (dict(stop_at_eos=True), ValueError, "needs eos_id"),
        (dict(eos_id=MASK), ValueError, "must differ"),
        (dict(eos_id=20), ValueError, "eos_id=20 is outside"),
        (dict(callback=3), TypeError, "callback must be callable"),
        (dict(return_stats=1), TypeError, "return_stats must be a bool"),
    ],
)
def test_generate_rejects_bad_input(change, error, match):
    kwargs = dict(prompt=torch.zeros(2, 3, dtype=torch.long), mask_id=MASK, gen_length=4, steps=4)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        dd.generate(
            lambda x, attention_mask=None: torch.zeros(*x.shape, VOCAB + 1),
            kwargs.pop("prompt"),
            **kwargs,
        )


def test_generate_rejects_a_model_with_the_wrong_output_shape():
    with pytest.raises(ValueError, match="model must return logits of shape"):
        dd.generate(
            lambda x: torch.zeros(x.shape[0], VOCAB + 1),
            torch.zeros(1, 2, dtype=torch.long),
            mask_id=MASK,
            gen_length=2,
            steps=2,
        )
