"""The KV cache (`diffusion.CachedDenoiser`, hf/cache.py) on the LLaDA family's stand-ins:
a fresh cache gives the full forward's logits with per-sample fast weights bound (routed
experts included), for padded batches and block-causal attention, and at every position of a
4K-token prompt to float rounding; `generate` with the cache rebuilt every step equals the
uncached sampler; block-causal LLaDA2 makes the dual cache exact.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import diffusion as dd
import memory as mm
from recipes.memdlm.backbones import hf
from recipes.memdlm.config import build_config
from tests.recipes.backbones import standins

NAMES = tuple(standins.FAMILIES)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, hf.HFDenoiser]:
    root = tmp_path_factory.mktemp("cache-families")
    out = {}
    for name in NAMES:
        folder = standins.write(name, Path(root) / name)
        tree = {
            "model": {"path": str(folder), "trust_remote_code": True},
            "memdlm": {"layer_fraction": 0.5},
        }
        out[name] = hf.load_model(build_config("smoke", overrides=tree), device="cpu").eval()
    return out


def bound_state(model, batch, seed=3):
    """Fast LoRA on the FFNs (routed experts too) of the last half, with non-zero B."""
    mem = mm.FastLoRA(model, model.fast_weight_targets(0.5), rank=2, alpha=4.0)
    g = torch.Generator().manual_seed(seed)
    state = mem.init(batch_size=batch, generator=g)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    return mem, state


def padded_tokens(model, rows=2, length=20, pad=3, seed=0):
    vocab = model.hf.config.vocab_size
    x = torch.randint(5, vocab - 1, (rows, length), generator=torch.Generator().manual_seed(seed))
    x[x == model.hf.config.mask_token_id] = 5
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, :pad] = False
    return x, mask


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_cache_gives_the_full_forward_with_fast_weights_bound(models, name):
    model = models[name]
    x, mask = padded_tokens(model)
    mem, state = bound_state(model, batch=2)
    try:
        with torch.no_grad(), mem.bind(state):
            full = model(x, mask)
            logits, cache = model.forward_with_cache(x, mask)
            windows = {
                (s, e): model.forward_from_cache(x[:, s:e], cache, start=s, attention_mask=mask)
                for s, e in [(0, 20), (12, 16), (8, 20), (19, 20)]
            }
            _, plain_cache = model.forward_with_cache(x, mask)  # bound too: same keys
        with torch.no_grad():
            _, unbound = model.forward_with_cache(x, mask)
            with mem.bind(state):
                stale = model.forward_from_cache(
                    x[:, 12:16], unbound, start=12, attention_mask=mask
                )
    finally:
        mem.remove()
    assert torch.equal(logits, full)
    for (s, e), window in windows.items():
        torch.testing.assert_close(window, full[:, s:e], rtol=1e-4, atol=1e-5)
    # Control: keys and values cached without the fast weights give other logits.
    assert (stale - full[:, 12:16]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["llada2", "dream"])
def test_block_causal_attention_is_kept_in_the_window(models, name):
    model = models[name]
    x, _ = padded_tokens(model)
    with model.attention_mode("block_causal", block_size=4), torch.no_grad():
        full = model(x)
        _, cache = model.forward_with_cache(x)
        window = model.forward_from_cache(x[:, 8:12], cache, start=8)
    torch.testing.assert_close(window, full[:, 8:12], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_generate_with_the_cache_rebuilt_every_step_is_the_uncached_sampler(models, name):
    model = models[name]
    x, mask = padded_tokens(model, length=8, seed=1)
    kw = dict(
        mask_id=model.hf.config.mask_token_id, gen_length=8, steps=8, block_length=4,
        attention_mask=mask,
    )  # fmt: skip
    mem, state = bound_state(model, batch=2)
    try:
        with torch.no_grad(), mem.bind(state):
            plain = dd.generate(model, x, **kw)
            for cache in ("prefix", "dual"):
                out = dd.generate(model, x, cache=cache, cache_refresh=1, **kw)
                assert torch.equal(out, plain)
                dd.generate(model, x, cache=cache, **kw)  # the approximate cache runs
    finally:
        mem.remove()


def test_the_dual_cache_is_exact_on_block_causal_llada2(models):
    model = models["llada2"]
    x, _ = padded_tokens(model, length=8, seed=2)
    kw = dict(mask_id=model.hf.config.mask_token_id, gen_length=8, steps=8, block_length=4)
    logits = {}
    with model.attention_mode("block_causal", block_size=4), torch.no_grad():
        for cache in (None, "dual"):
            trace = []

            def record(info, trace=trace):
                lo = 8 + 4 * info.block - info.logits_start
                trace.append(info.logits[:, lo : lo + 4])

            logits[cache] = (dd.generate(model, x, cache=cache, callback=record, **kw), trace)
    assert torch.equal(logits[None][0], logits["dual"][0])
    for a, b in zip(logits[None][1], logits["dual"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- long prompts

LONG = 4096  # the stand-ins' context here; the paper evaluates at 4K-32K


def sharpen(model: hf.HFDenoiser, seed: int = 0, gain: float = 2.0, head: float = 10.0) -> None:
    """Weights at a trained model's scale, where positions matter: every matrix N(0, gain^2 /
    fan_in) (sharp attention, so a rotation error moves the output), the LM head `head` times
    larger (logits of size ~50, as a real model's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.hf.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[1]))
        model.hf.get_output_embeddings().weight.mul_(head / gain)


@pytest.fixture(scope="module")
def long_models(tmp_path_factory) -> dict[str, hf.HFDenoiser]:
    root = tmp_path_factory.mktemp("cache-long")
    context = {"max_sequence_length": LONG, "max_position_embeddings": LONG}
    out = {}
    for name in NAMES:
        folder = standins.write(name, Path(root) / name, config=context)
        tree = {"model": {"path": str(folder), "trust_remote_code": True}}
        model = hf.load_model(build_config("smoke", overrides=tree), device="cpu").eval()
        sharpen(model)
        out[name] = model
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_the_window_is_the_full_forward_at_every_position_of_a_4k_prompt(long_models, name, dtype):
    """Windows of 256 tiling all 4096 positions (and the last one alone) against a fresh cache:
    the largest difference from the full forward is at most 1e-5 of the logits' size in float32
    (measured: <= 1.2e-6) and 1e-12 in float64 (measured: <= 3e-16).

    Before hf/cache.py rotated LLaDA's window once at its absolute positions, it rotated it
    from 0 and then on by `start` (two float32-rounded angles for the table's one). Measured
    with this test on the old code (logits of size 50): 5.6e-2 in float32, 5.7e-2 in float64
    (LLaDA's rotary runs in float32), 1.1e-3 of the scale, 110 times the float32 bound; for
    32-token windows 1.7e-4 at position 40, 5.3e-3 at 1000, 1.7e-2 at 4064 (the issue's
    2e-4 / 2.5e-3 / 1.1e-2). The HF-style families (rotary from `position_ids`) were exact.
    """
    model = long_models[name].to(dtype)
    vocab = model.hf.config.vocab_size
    x = torch.randint(5, vocab - 1, (1, LONG), generator=torch.Generator().manual_seed(0))
    x[x == model.hf.config.mask_token_id] = 5
    spans = [(s, s + 256) for s in range(0, LONG, 256)] + [(LONG - 1, LONG)]
    try:
        with torch.no_grad():
            full, cache = model.forward_with_cache(x)
            windows = [model.forward_from_cache(x[:, s:e], cache, start=s) for s, e in spans]
    finally:
        model.float()
    drift = max(float((w - full[:, s:e]).abs().max()) for w, (s, e) in zip(windows, spans))
    scale = float(full.abs().max())
    assert scale > 20  # logits of a trained model's size, so the bound means something
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    assert drift <= bound * scale, (drift, scale)
