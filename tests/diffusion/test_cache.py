"""The KV cache of `generate(cache=...)` and classifier-free guidance (`cfg_scale`).

Exactness: the reference Transformer's cached forward equals its full forward on a fresh cache;
a cache rebuilt at every step gives the uncached sampler's tokens; on a block-causal model
(LLaDA2.x style) the dual cache is exact; the cached sampler equals an oracle written from
Fast-dLLM v1's published algorithm (arXiv 2505.22618, its `generate_with_prefix_cache` /
`generate_with_dual_cache` loops) on a cache implemented here independently. Batch correctness:
a row's output does not depend on the rows beside it or on their padding. CFG: the logits follow
LLaDA's formula `un + (w + 1)(cond - un)` with the prompt masked in the unconditional rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffusion as dd
from diffusion.transformer import apply_rotary

VOCAB = 8
MASK = VOCAB  # the models have VOCAB + 1 outputs; the last is the mask token
EOS = 7


def _transformer(seed=0, n_layers=2, max_seq_len=96):
    torch.manual_seed(seed)
    model = dd.Transformer(
        VOCAB + 1, d_model=32, n_layers=n_layers, n_heads=2, d_ff=64, max_seq_len=max_seq_len
    )
    return model.double().eval()


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), EOS)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = p
        mask[i, width - len(p) :] = True
    return batch, mask


# --------------------------------------------------------------------------- the model side
@pytest.mark.parametrize("mask_kind", [None, "padding", "query_by_key"])
def test_cached_forward_equals_the_full_forward_on_a_fresh_cache(mask_kind):
    model = _transformer(seed=1)
    x = torch.randint(0, VOCAB + 1, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(3, 24, dtype=torch.bool)
        mask[0, :5] = mask[2, :1] = False
    elif mask_kind == "query_by_key":
        mask = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(1)) > 0.4
        mask |= torch.eye(24, dtype=torch.bool)
    full = model(x, mask)
    logits, cache = model.forward_with_cache(x, mask)
    assert torch.equal(logits, full)
    assert isinstance(model, dd.CachedDenoiser) and dd.supports_cache(model)
    for start, stop in [(0, 24), (8, 16), (16, 24), (23, 24)]:
        window = model.forward_from_cache(x[:, start:stop], cache, start=start, attention_mask=mask)
        torch.testing.assert_close(window, full[:, start:stop], rtol=0, atol=1e-12)
    # Control: a stale cache (built from other tokens) changes the window's logits.
    _, stale = model.forward_with_cache(torch.zeros_like(x), mask)
    window = model.forward_from_cache(x[:, 8:16], stale, start=8, attention_mask=mask)
    assert (window - full[:, 8:16]).abs().max() > 1e-3


def test_cached_forward_rejects_a_window_outside_the_cache():
    model = _transformer()
    x = torch.zeros(2, 10, dtype=torch.long)
    _, cache = model.forward_with_cache(x)
    with pytest.raises(ValueError, match="do not fit a cache"):
        model.forward_from_cache(x[:, :4], cache, start=8)
    with pytest.raises(ValueError, match="do not fit a cache"):
        model.forward_from_cache(x[:1, :4], cache, start=0)
    with pytest.raises(ValueError, match="cache must be the tuple"):
        model.forward_from_cache(x[:, :4], cache[:1], start=0)


# --------------------------------------------------------------------------- generate
MODES = [
    dict(steps=16),  # fixed counts, one token per step
    dict(steps=8),  # fixed counts, two per step
    dict(steps=4, threshold=0.3),  # Fast-dLLM's parallel decoding
]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("mode", MODES)
def test_a_cache_rebuilt_every_step_gives_the_uncached_tokens(cache, mode):
    model = _transformer(seed=2)
    batch, mask = _left_padded(_prompts(3, [5, 9, 2]))
    kw = dict(mask_id=MASK, gen_length=16, block_length=4, attention_mask=mask, **mode)
    plain, plain_stats = dd.generate(model, batch, return_stats=True, **kw)
    out, stats = dd.generate(model, batch, cache=cache, cache_refresh=1, return_stats=True, **kw)
    assert torch.equal(out, plain)
    assert stats.model_calls == plain_stats.model_calls
    assert torch.equal(stats.committed_per_step, plain_stats.committed_per_step)


class BlockCausal(torch.nn.Module):
    """LLaDA2.x-style attention: the prompt is block 0, each generation block of `block`
    positions one block after it; a query sees keys of its own and earlier blocks."""

    def __init__(self, inner, prompt_length, block):
        super().__init__()
        self.inner, self.prompt_length, self.block = inner, prompt_length, block

    def allowed(self, batch, length):
        pos = torch.arange(length)
        ids = torch.where(pos < self.prompt_length, 0, 1 + (pos - self.prompt_length) // self.block)
        return (ids[None, :] <= ids[:, None]).expand(batch, length, length)

    def forward(self, x, attention_mask=None):
        assert attention_mask is None
        return self.inner(x, self.allowed(*x.shape))

    def forward_with_cache(self, x, attention_mask=None):
        return self.inner.forward_with_cache(x, self.allowed(*x.shape))

    def forward_from_cache(self, tokens, cache, *, start, attention_mask=None):
        length = cache[0][0].shape[2]
        allowed = self.allowed(tokens.shape[0], length)
        return self.inner.forward_from_cache(tokens, cache, start=start, attention_mask=allowed)


def _block_logits(model, prompt, **kw):
    """Each step's logits of the current block's positions, from the callback."""
    out = []

    def record(info):
        lo = prompt.shape[1] + info.block * kw["block_length"]
        start = lo - info.logits_start
        out.append(info.logits[:, start : start + kw["block_length"]])

    tokens = dd.generate(model, prompt, callback=record, **kw)
    return tokens, out


@pytest.mark.parametrize("mode", MODES)
def test_the_dual_cache_is_exact_on_a_block_causal_model(mode):
    model = BlockCausal(_transformer(seed=4), prompt_length=6, block=4)
    prompt = torch.stack(_prompts(5, [6, 6, 6]))
    kw = dict(mask_id=MASK, gen_length=16, block_length=4, **mode)
    plain, plain_logits = _block_logits(model, prompt, **kw)
    for cache in ("dual", "prefix"):
        out, logits = _block_logits(model, prompt, cache=cache, **kw)
        assert torch.equal(out, plain)
        for got, want in zip(logits, plain_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Control: with the same weights attending bidirectionally the dual cache is approximate.
    _, plain_logits = _block_logits(model.inner, prompt, **kw)
    _, logits = _block_logits(model.inner, prompt, cache="dual", **kw)
    assert max((a - b).abs().max() for a, b in zip(logits, plain_logits)) > 1e-4


# --------------------------------------------------------------------------- Fast-dLLM oracle
class NoMask(torch.nn.Module):
    """The transformer with the mask token's logit at -inf (Fast-dLLM's argmax and softmax
    include the mask token, ours exclude it: the two agree on such a model)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @staticmethod
    def _drop(logits):
        return logits.masked_fill(torch.arange(VOCAB + 1) == MASK, -torch.inf)

    def forward(self, x, attention_mask=None):
        return self._drop(self.inner(x, attention_mask))

    def forward_with_cache(self, x, attention_mask=None):
        logits, cache = self.inner.forward_with_cache(x, attention_mask)
        return self._drop(logits), cache

    def forward_from_cache(self, tokens, cache, *, start, attention_mask=None):
        logits = self.inner.forward_from_cache(
            tokens, cache, start=start, attention_mask=attention_mask
        )
        return self._drop(logits)


def oracle_model(model, x, past_key_values=None, replace_position=None):
    """A LLaDA-style cached forward written here from the transformer's weights (batch 1):
    no past: the whole sequence, returning every layer's (k, v); past without
    `replace_position`: x continues the cached prefix; with `replace_position` (1, L) bool:
    x holds those positions and its k, v overwrite the cache's there (Fast-dLLM's dual cache).
    Returns (logits with the mask token at -inf, [(k, v) per layer])."""
    if past_key_values is None:
        positions = torch.arange(x.shape[1])
    elif replace_position is None:
        positions = past_key_values[0][0].shape[2] + torch.arange(x.shape[1])
    else:
        positions = replace_position[0].nonzero()[:, 0]
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    h = model.embed(x)
    present = []
    for i, layer in enumerate(model.layers):
        att = layer.attn
        a = layer.attn_norm(h)

        def heads(proj, a=a, att=att):
            return proj(a).view(1, x.shape[1], att.n_heads, att.head_dim).transpose(1, 2)

        q = apply_rotary(heads(att.q_proj), cos, sin)
        k = apply_rotary(heads(att.k_proj), cos, sin)
        v = heads(att.v_proj)
        if past_key_values is not None:
            past_k, past_v = past_key_values[i]
            if replace_position is None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            else:
                past_k, past_v = past_k.clone(), past_v.clone()
                past_k[:, :, positions], past_v[:, :, positions] = k, v
                k, v = past_k, past_v
        present.append((k, v))
        scores = (q @ k.transpose(-1, -2)) / att.head_dim**0.5
        out = scores.softmax(-1) @ v
        h = h + att.o_proj(out.transpose(1, 2).reshape(1, x.shape[1], -1))
        h = layer.feed_forward(h)
    logits = model.lm_head(model.norm(h))
    return logits.masked_fill(torch.arange(VOCAB + 1) == MASK, -torch.inf), present


def oracle_transfer(logits, mask_index, x, count, threshold):
    """Fast-dLLM's transfer rule, greedy: argmax proposals, softmax confidence; `count` most
    confident, or (threshold) the most confident plus all others at or above the threshold."""
    x0 = logits.argmax(-1)
    p = F.softmax(logits.double(), dim=-1)
    conf = torch.gather(p, -1, x0[..., None])[..., 0]
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, conf, -torch.inf)
    k = int(mask_index.sum()) if threshold is not None else count
    order = torch.topk(conf[0], k=k).indices
    transfer = torch.zeros_like(mask_index)
    transfer[0, order] = True
    if threshold is not None:
        for j in order[1:]:
            if conf[0, j] < threshold:
                transfer[0, j] = False
    return x0, transfer


def fast_dllm(model, prompt, *, gen_length, block_length, steps, threshold, dual):
    """Fast-dLLM v1's prefix / dual cache sampler (batch 1), from the published algorithm.
    Returns the tokens and, per step, the logits of the current block's positions."""
    p = prompt.shape[1]
    trace = []
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], dim=1)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        s, e = p + b * block_length, p + (b + 1) * block_length
        counts = dd.transfer_schedule(int((x[:, s:e] == MASK).sum()), steps_per_block)
        logits, past = oracle_model(model, x)  # the block's first step refreshes the cache
        trace.append(logits[:, s:e])
        mask_index = x == MASK
        mask_index[:, e:] = False
        x0, transfer = oracle_transfer(logits, mask_index, x, int(counts[0]), threshold)
        x[transfer] = x0[transfer]
        if not dual:
            past = [(k[:, :, :s], v[:, :, :s]) for k, v in past]
        i = 1
        while bool((x[:, s:e] == MASK).any()):
            if dual:
                replace = torch.zeros_like(x, dtype=torch.bool)
                replace[:, s:e] = True
                logits, _ = oracle_model(model, x[:, s:e], past, replace)
                trace.append(logits)
                mask_index = x[:, s:e] == MASK
                x0, transfer = oracle_transfer(
                    logits, mask_index, x[:, s:e], int(counts[min(i, len(counts) - 1)]), threshold
                )
                x[:, s:e][transfer] = x0[transfer]
            else:
                logits, _ = oracle_model(model, x[:, s:], past)
                trace.append(logits[:, :block_length])
                mask_index = x[:, s:] == MASK
                mask_index[:, block_length:] = False
                x0, transfer = oracle_transfer(
                    logits, mask_index, x[:, s:], int(counts[min(i, len(counts) - 1)]), threshold
                )
                x[:, s:][transfer] = x0[transfer]
            i += 1
    return x, trace


def _sharp(model, scale=5.0):
    """The model with its weights scaled up: a random model's outputs then vary with context."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(scale)
    return model


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("mode", MODES)
def test_the_cached_sampler_equals_fast_dllm(cache, mode):
    """Tokens equal, and every step's block logits equal the oracle's to rounding."""
    inner = _sharp(_transformer(seed=6))
    model = NoMask(inner)
    prompts = _prompts(7, [7, 3, 11])
    kw = dict(gen_length=16, block_length=4, steps=mode["steps"])
    threshold = mode.get("threshold")
    expected = [
        fast_dllm(inner, q[None], threshold=threshold, dual=cache == "dual", **kw) for q in prompts
    ]
    for q, (want, want_trace) in zip(prompts, expected):
        got, trace = _block_logits(
            model, q[None], mask_id=MASK, threshold=threshold, cache=cache, **kw
        )
        assert torch.equal(got, want)
        for a, b in zip(trace, want_trace, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        # Control: the uncached sampler's logits differ from the cached ones.
        _, plain = _block_logits(model, q[None], mask_id=MASK, threshold=threshold, **kw)
        finite = [(a - b).nan_to_num(posinf=0, neginf=0) for a, b in zip(trace, plain)]
        assert max(d.abs().max() for d in finite) > 1e-4
    # Batch correctness: the same prompts left-padded into one batch give the same rows.
    batch, mask = _left_padded(prompts)
    together = dd.generate(
        model, batch, mask_id=MASK, threshold=threshold, cache=cache, attention_mask=mask, **kw
    )
    for row, q, (want, _) in zip(together, prompts, expected):
        assert torch.equal(row[batch.shape[1] :], want[0, len(q) :])


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_a_row_does_not_depend_on_its_batch(cache):
    """Threshold decoding (rows need different numbers of steps per block) with CFG: each row
    of a padded batch equals the row alone and the row in another company."""
    model = _sharp(_transformer(seed=8))
    prompts = _prompts(9, [4, 10, 6, 2])
    kw = dict(mask_id=MASK, gen_length=12, block_length=4, steps=3, threshold=0.4)
    kw.update(cache=cache, cfg_scale=0.5)
    alone = [dd.generate(model, q[None], **kw)[0, len(q) :] for q in prompts]
    for group in ([0, 1, 2, 3], [3, 1], [2, 0]):
        batch, mask = _left_padded([prompts[i] for i in group])
        out = dd.generate(model, batch, attention_mask=mask, **kw)
        for row, i in zip(out, group):
            assert torch.equal(row[batch.shape[1] :], alone[i])


def test_the_cache_keeps_the_number_of_model_calls_and_shortens_them():
    model = _transformer(seed=10)
    prompt = torch.stack(_prompts(11, [20, 20]))
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            seen.append(("full", x.shape[1]))
            return model(x, attention_mask)

        def forward_with_cache(self, x, attention_mask=None):
            seen.append(("refresh", x.shape[1]))
            return model.forward_with_cache(x, attention_mask)

        def forward_from_cache(self, tokens, cache, *, start, attention_mask=None):
            seen.append((start, tokens.shape[1]))
            return model.forward_from_cache(tokens, cache, start=start, attention_mask=None)

    kw = dict(mask_id=MASK, gen_length=8, block_length=4, steps=8, return_stats=True)
    _, stats = dd.generate(Spy(), prompt, cache="dual", **kw)
    assert stats.model_calls == 8
    assert seen == [("refresh", 28), (20, 4), (20, 4), (20, 4)] + [
        ("refresh", 28),
        (24, 4),
        (24, 4),
        (24, 4),
    ]
    seen.clear()
    dd.generate(Spy(), prompt, cache="prefix", cache_refresh=2, **kw)
    assert seen == [("refresh", 28), (20, 8), ("refresh", 28), (20, 8)] + [
        ("refresh", 28),
        (24, 4),
        ("refresh", 28),
        (24, 4),
    ]


# --------------------------------------------------------------------------- CFG
def test_cfg_follows_llada_formula_with_the_prompt_masked():
    model = _transformer(seed=12)
    batch, mask = _left_padded(_prompts(13, [5, 3]))
    width = batch.shape[1]
    calls, infos = [], []

    def spy(x, attention_mask=None):
        calls.append((x.clone(), attention_mask))
        return model(x, attention_mask)

    w = 1.5
    dd.generate(
        spy,
        batch,
        mask_id=MASK,
        gen_length=8,
        steps=8,
        block_length=4,
        attention_mask=mask,
        cfg_scale=w,
        callback=infos.append,
    )
    assert len(calls) == len(infos) == 8
    for (rows, rows_mask), info in zip(calls, infos):
        cond, uncond = rows.chunk(2)
        assert torch.equal(cond, info.tokens)
        assert bool((uncond[:, :width] == MASK).all())  # every prompt position, padding too
        assert torch.equal(uncond[:, width:], cond[:, width:])
        full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.bool)], dim=1)
        assert torch.equal(rows_mask, torch.cat([full_mask, full_mask]))
        expected = model(uncond, full_mask) + (w + 1) * (
            model(cond, full_mask) - model(uncond, full_mask)
        )
        torch.testing.assert_close(info.logits, expected, rtol=0, atol=1e-12)
    # cfg_scale=0 is the unguided sampler (B rows per call).
    plain = dd.generate(model, batch, mask_id=MASK, gen_length=8, steps=8, attention_mask=mask)
    zero = dd.generate(
        model, batch, mask_id=MASK, gen_length=8, steps=8, attention_mask=mask, cfg_scale=0.0
    )
    assert torch.equal(plain, zero)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(cache="full"), ValueError, "cache must be one of"),
        (dict(cache_refresh=2), ValueError, "needs cache="),
        (dict(cache="dual", cache_refresh=0), ValueError, "cache_refresh must be >= 1"),
        (dict(cfg_scale=-1.0), ValueError, "cfg_scale must be finite and >= 0"),
        (dict(cfg_scale=True), TypeError, "cfg_scale must be a float"),
        (dict(cache="dual", compiler=torch.compile), ValueError, "compiler is not supported"),
    ],
)
def test_bad_cache_and_cfg_arguments_raise(kwargs, error, match):
    model = _transformer()
    with pytest.raises(error, match=match):
        dd.generate(
            model,
            torch.zeros(1, 3, dtype=torch.long),
            mask_id=MASK,
            gen_length=4,
            steps=4,
            **kwargs,
        )


def test_a_model_without_the_protocol_is_refused_a_cache():
    model = _transformer()

    def plain(x, attention_mask=None):
        return model(x, attention_mask)

    with pytest.raises(TypeError, match="forward_with_cache"):
        dd.generate(
            plain,
            torch.zeros(1, 3, dtype=torch.long),
            mask_id=MASK,
            gen_length=4,
            steps=4,
            cache="prefix",
        )
