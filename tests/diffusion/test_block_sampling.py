"""diffusion.generate_block_aligned: LLaDA2.x's block-aligned threshold sampler.

Closed forms (schedule, threshold rule, EOS rule), invariants, prefix vs whole-canvas calls on a
block-causal model, and an independent oracle written from the published description
(docs/memdlm.md, "The LLaDA2.1 sampler of the reference evaluation").
"""

from __future__ import annotations

import math

import pytest
import torch

import diffusion as dd

V = 7
MASK = 6


# --------------------------------------------------------------------------- tiny models
class TinyAttention(torch.nn.Module):
    """One attention layer over (token, position) embeddings; `block` = None attends to every
    position, else block-causally (blocks of `block` from position 0). Row-wise, so rows of a
    batch do not interact."""

    def __init__(self, seed: int, block: int | None = None, max_len: int = 40, scale=0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = 8
        self.tok = torch.randn(V, d, generator=g, dtype=torch.float64)
        self.pos = torch.randn(max_len, d, generator=g, dtype=torch.float64)
        self.qkv = torch.randn(3, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        self.head = torch.randn(d, V, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
        self.block = block
        self.calls: list[torch.Tensor] = []

    def forward(self, x):
        self.calls.append(x.clone())
        n = x.shape[1]
        h = self.tok[x] + self.pos[:n]
        q, k, v = (h @ w for w in self.qkv)
        scores = q @ k.transpose(1, 2) / math.sqrt(h.shape[-1])
        if self.block is not None:
            blocks = torch.arange(n) // self.block
            scores = scores.masked_fill(blocks[None, :] > blocks[:, None], -math.inf)
        return (h + torch.softmax(scores, -1) @ v) @ self.head


class Table:
    """Context-free logits: row i of `table` (L, V) at position i; records its inputs."""

    def __init__(self, table):
        self.table = table
        self.calls: list[torch.Tensor] = []

    def __call__(self, x):
        self.calls.append(x.clone())
        return self.table[: x.shape[1]].expand(x.shape[0], -1, -1)


def peaked(length, targets: dict[int, tuple[int, float]]):
    """A table whose position i puts probability q on token t ((t, q) = targets[i]) and the
    rest evenly on the other tokens; uniform elsewhere."""
    table = torch.zeros(length, V, dtype=torch.float64)
    for i, (t, q) in targets.items():
        table[i] = math.log((1 - q) / (V - 1))
        table[i, t] = math.log(q)
    return table


# --------------------------------------------------------------------------- the oracle
def oracle(
    model, prompt_row, *, gen_length, block_length, steps_per_block, threshold, topk, rules=None
):
    """The published description, one row at a time in plain Python (greedy). `rules`, a set,
    collects which commit rule each step used ("threshold" or "top")."""
    P = len(prompt_row)
    n_blocks = (P + gen_length + block_length - 1) // block_length
    canvas = list(prompt_row) + [MASK] * (n_blocks * block_length - P)
    S = min(steps_per_block, gen_length // topk)
    counts = [block_length // S + (1 if k < block_length % S else 0) for k in range(S)]
    for j in range(P // block_length, n_blocks):
        lo, hi = j * block_length, (j + 1) * block_length
        for c in counts:
            masked = [i for i in range(lo, hi) if canvas[i] == MASK]
            if not masked:
                break
            logits = model(torch.tensor([canvas[:hi]]))[0].tolist()
            best = {}
            for i in masked:
                row = logits[i]
                top = max(row)
                z = sum(math.exp(v - top) for v in row)
                best[i] = (row.index(top), 1.0 / z)
            high = [i for i in masked if best[i][1] > threshold]
            if len(high) >= c:
                commit = high
                rules is None or rules.add("threshold")
            else:
                rules is None or rules.add("top")
                commit = sorted(masked, key=lambda i: -best[i][1])[: min(c, len(masked))]
            for i in commit:
                canvas[i] = best[i][0]
    return canvas


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("prompt_length", "gen_length", "block_length", "steps_per_block", "threshold", "topk"),
    [
        (3, 8, 4, None, 0.5, 1),  # prompt ends mid-block
        (4, 8, 4, None, 0.5, 1),  # prompt ends at a block boundary
        (5, 6, 4, None, 0.4, 2),  # steps capped by minimal_topk: min(4, 3) = 3
        (8, 5, 4, 2, 0.6, 1),  # two steps per block, counts (2, 2)
        (6, 9, 4, 6, 0.4, 1),  # more steps than block positions: counts (1,1,1,1,0,0)
        (0, 7, 3, None, 0.95, 1),  # empty prompt
        (2, 4, 8, 3, 0.3, 1),  # one block holds prompt and generation, padding after
    ],
)
def test_matches_an_oracle_written_from_the_description(
    seed, prompt_length, gen_length, block_length, steps_per_block, threshold, topk
):
    model = TinyAttention(seed)
    g = torch.Generator().manual_seed(seed + 10)
    prompt = torch.randint(0, MASK, (2, prompt_length), generator=g)
    out = dd.generate_block_aligned(
        model, prompt, mask_id=MASK, gen_length=gen_length, block_length=block_length,
        steps_per_block=steps_per_block, threshold=threshold, minimal_topk=topk,
    )  # fmt: skip
    spb = block_length if steps_per_block is None else steps_per_block
    for row in range(2):
        want = oracle(
            model, prompt[row].tolist(), gen_length=gen_length, block_length=block_length,
            steps_per_block=spb, threshold=threshold, topk=topk,
        )  # fmt: skip
        assert out[row].tolist() == want


def test_the_oracle_cases_exercise_both_commit_rules():
    rules = set()
    for seed in (0, 1):
        for threshold in (0.4, 0.5, 0.6):
            oracle(
                TinyAttention(seed), [1, 2, 3], gen_length=8, block_length=4, steps_per_block=4,
                threshold=threshold, topk=1, rules=rules,
            )  # fmt: skip
    assert rules == {"threshold", "top"}


# --------------------------------------------------------------------------- closed forms
def test_even_transfer_schedule_and_step_count():
    for lb in range(1, 10):
        for s in range(1, 12):
            counts = dd.even_transfer_schedule(lb, s).tolist()
            assert counts == [lb // s + (k < lb % s) for k in range(s)] and sum(counts) == lb
    assert dd.block_aligned_steps(512) == 32  # the authors' evaluation: 32 steps per block
    assert dd.block_aligned_steps(10, block_length=4, minimal_topk=3) == 3
    assert dd.block_aligned_steps(10, block_length=4, steps_per_block=9) == 9
    assert dd.block_aligned_steps(10, block_length=4, steps_per_block=9, minimal_topk=5) == 2


def commits_per_call(calls, out, block_length):
    """Masks filled between consecutive model calls (the last against the output)."""
    after = [*calls[1:], out]
    return [
        int((before == MASK).sum()) - int((nxt[:, : before.shape[1]] == MASK).sum())
        for before, nxt in zip(calls, after)
    ]


def test_commits_follow_the_schedule_when_nothing_passes_the_threshold():
    # Uniform logits: every probability is 1/V < threshold, so step k commits min(c_k, #masked).
    # P = 3, gen 10, Lb = 4: canvas 16; S = min(4, 10 // 3) = 3, counts (2, 1, 1).
    model = Table(torch.zeros(16, V, dtype=torch.float64))
    prompt = torch.tensor([[1, 2, 3]])
    out = dd.generate_block_aligned(
        model, prompt, mask_id=MASK, gen_length=10, block_length=4, minimal_topk=3
    )
    assert out.shape == (1, 16) and not bool((out == MASK).any())
    assert [c.shape[1] for c in model.calls] == [4] + [8] * 3 + [12] * 3 + [16] * 3
    assert commits_per_call(model.calls, out, 4) == [1] + [2, 1, 1] * 3


def test_the_threshold_rule_in_closed_form():
    # Lb = 4, prompt = one whole block; generation is block 1 (positions 4..7).
    prompt = torch.tensor([[0, 1, 2, 3]])
    probs = {4: (1, 0.99), 5: (2, 0.97), 6: (3, 0.5), 7: (4, 0.6)}
    model = Table(peaked(8, probs))
    out = dd.generate_block_aligned(model, prompt, mask_id=MASK, gen_length=4, block_length=4)
    # counts (1, 1, 1, 1): step 0 commits both tokens above 0.95; then the most probable, 7;
    # then 6; the fourth step is not run (the block is full).
    assert out[0, 4:].tolist() == [1, 2, 3, 4]
    masks = [(c[0, 4:] == MASK).tolist() for c in model.calls]
    assert masks == [[True] * 4, [False, False, True, True], [False, False, True, False]]

    # counts (2, 2): one above threshold is fewer than 2, so the 2 most probable (4, 7).
    probs = {4: (1, 0.99), 5: (2, 0.5), 6: (3, 0.6), 7: (4, 0.4)}
    model = Table(peaked(8, probs))
    out = dd.generate_block_aligned(
        model, prompt, mask_id=MASK, gen_length=4, block_length=4, steps_per_block=2
    )
    assert out[0, 4:].tolist() == [1, 2, 3, 4]
    assert (model.calls[1][0, 4:] == MASK).tolist() == [False, True, False, True]
    assert len(model.calls) == 2


def test_zero_count_steps_commit_only_above_threshold():
    # steps_per_block 6 > Lb = 2: counts (1, 1, 0, 0, 0, 0); p > threshold everywhere.
    probs = {2: (1, 0.99), 3: (2, 0.98)}
    model = Table(peaked(4, probs))
    out = dd.generate_block_aligned(
        model, torch.tensor([[0, 1]]), mask_id=MASK, gen_length=2, block_length=2,
        steps_per_block=6,
    )  # fmt: skip
    assert out[0].tolist() == [0, 1, 1, 2] and len(model.calls) == 1


def test_prompt_and_committed_tokens_never_change_and_no_mask_is_left():
    inner = TinyAttention(3)

    def model(x):  # the mask token is never the argmax
        return inner(x) - 100.0 * (torch.arange(V) == MASK)

    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(0))
    out = dd.generate_block_aligned(
        model, prompt, mask_id=MASK, gen_length=9, block_length=4, threshold=0.5
    )
    assert out.shape == (3, 16) and torch.equal(out[:, :5], prompt)
    assert not bool((out == MASK).any())
    for before, after in zip(inner.calls, [*inner.calls[1:], out]):
        fixed = before != MASK
        assert torch.equal(after[:, : before.shape[1]][fixed], before[fixed])


def test_prefix_calls_equal_whole_canvas_calls_on_a_block_causal_model():
    class WholeCanvas:
        """Runs `inner` on the prefix padded with masks to the whole canvas, returns the
        prefix's logits: what a caller giving the model the full canvas would see."""

        def __init__(self, inner, total):
            self.inner, self.total = inner, total

        def __call__(self, x):
            pad = x.new_full((x.shape[0], self.total - x.shape[1]), MASK)
            return self.inner(torch.cat([x, pad], 1))[:, : x.shape[1]]

    prompt = torch.randint(0, MASK, (2, 6), generator=torch.Generator().manual_seed(4))
    kwargs = dict(mask_id=MASK, gen_length=13, block_length=4, threshold=0.4)
    differs = False
    for block in (4, None):
        model = TinyAttention(5, block=block)
        prefix = dd.generate_block_aligned(model, prompt, **kwargs)
        whole = dd.generate_block_aligned(WholeCanvas(model, 20), prompt, **kwargs)
        if block is not None:
            assert torch.equal(prefix, whole)
        else:
            differs = not torch.equal(prefix, whole)
    assert differs  # the comparison can fail: a bidirectional model sees the later masks


def test_stop_at_eos_skips_the_rest_of_the_block_as_the_authors_do():
    # Block 1 (positions 4..7): EOS (token 5) is the most probable commit of step 0; the
    # block's other steps are skipped and it keeps three masks; block 2 is decoded as usual.
    probs = {4: (5, 0.9), 5: (1, 0.5), 6: (2, 0.5), 7: (3, 0.5)}
    probs.update({8: (1, 0.9), 9: (2, 0.9), 10: (3, 0.9), 11: (4, 0.9)})
    model = Table(peaked(12, probs))
    prompt = torch.tensor([[0, 1, 2, 3]])
    kwargs = dict(mask_id=MASK, gen_length=8, block_length=4, eos_id=5)
    out = dd.generate_block_aligned(model, prompt, stop_at_eos=True, **kwargs)
    assert out[0, 4:].tolist() == [5, MASK, MASK, MASK, 1, 2, 3, 4]
    full = dd.generate_block_aligned(model, prompt, **kwargs)
    assert not bool((full == MASK).any())


def test_temperature_draws_from_the_tempered_softmax(chi2_pvalue):
    # One masked position per row and one step: the committed token is one draw.
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.2, -0.3, -9.0], dtype=torch.float64)
    model = Table(torch.stack([logits, logits]))
    rows = 3000
    out = dd.generate_block_aligned(
        model, torch.zeros(rows, 1, dtype=torch.long), mask_id=MASK, gen_length=1,
        block_length=2, temperature=2.0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    counts = torch.bincount(out[:, 1], minlength=V)[:MASK]
    expected = torch.softmax(logits / 2.0, 0)[:MASK]
    assert chi2_pvalue(counts, expected / expected.sum()) > 1e-3
    again = dd.generate_block_aligned(
        model, torch.zeros(rows, 1, dtype=torch.long), mask_id=MASK, gen_length=1,
        block_length=2, temperature=2.0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(gen_length=0), ValueError, "gen_length"),
        (dict(block_length=0), ValueError, "block_length"),
        (dict(steps_per_block=0), ValueError, "steps_per_block"),
        (dict(minimal_topk=0), ValueError, "minimal_topk"),
        (dict(minimal_topk=9), ValueError, "minimal_topk"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(threshold=float("nan")), ValueError, "threshold"),
        (dict(stop_at_eos=True), ValueError, "eos_id"),
        (dict(mask_id=-1), ValueError, "mask_id"),
        (dict(mask_id=V), ValueError, "mask_id"),
        (dict(eos_id=V), ValueError, "eos_id"),
        (dict(prompt=torch.tensor([[1, MASK]])), ValueError, "prompt"),
        (dict(prompt=torch.tensor([1, 2])), ValueError, "prompt"),
        (dict(prompt=torch.tensor([[1.0]])), TypeError, "prompt"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    kwargs = dict(prompt=torch.tensor([[1, 2]]), mask_id=MASK, gen_length=8, block_length=4)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        dd.generate_block_aligned(Table(torch.zeros(16, V)), **kwargs)
