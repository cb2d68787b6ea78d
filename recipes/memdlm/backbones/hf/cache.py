"""`diffusion.CachedDenoiser` for the LLaDA family's remote code (LLaDA-8B, LLaDA-MoE, LLaDA2.x,
Dream), driven through the model's OWN forward, as the split forward is (denoiser.py).

Every family's attention ends in `torch.nn.functional.scaled_dot_product_attention` with queries
and keys after rotary (and QK-norm, and the GQA repeat). While the model runs, that function is
replaced (in this thread's process, for the duration of one forward) by:

- `forward_with_cache`: a recorder that keeps each call's keys and values (call i = layer i) and
  runs attention unchanged: the logits are the full forward's;
- `forward_from_cache`: a window call. The model runs on the window's tokens only, with
  `position_ids` of their true positions; at each layer the window's keys and values replace the
  cached ones at its positions and its queries attend to all of them, under the rows of the same
  mask the full forward uses (padding, block-causal), as an additive mask.

The cached keys are rotated (RoPE), so the window's queries and keys must be rotated by exactly
the angles the full forward used at their positions. The HF-style families compute them from
`position_ids` elementwise, as in the full forward. LLaDA-8B takes no positions: each block's
`rotary_emb(q, k)` rotates positions 0, 1, ... of its input. Its window is rotated ONCE at its
absolute positions (`_llada_rotary_at`): that call gets `start` zero rows in front of q and k,
runs the model's own rotary over positions 0 .. start + w - 1 (the full forward's table) and
drops the front rows. (Rotating from 0 and then on by `start` adds two float32-rounded angles,
which drift from the table's one as positions grow: up to 5.6e-2 on logits of size 50 over a
4K prompt, tests/recipes/backbones/test_cache.py.)

Dream's logits at i - 1 predict token i: its window starts one position early (the token there
comes from the cache's sequence, which never changes before a block) and the shift is undone as
in `HFDenoiser.forward`. Fast weights bound on the model's linear layers act in both calls.
A model whose attention does not call SDPA once per layer (an eager LLaDA2, say) is refused
with a TypeError.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipes.memdlm.backbones.hf.attention import allowed_keys

CACHED_FAMILIES = ("llada", "llada_moe", "llada2", "dream")


@dataclass(frozen=True)
class HFKVCache:
    """Each layer's keys and values (B, H, L, hd) as its SDPA call saw them, and the tokens."""

    tokens: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


@contextlib.contextmanager
def _sdpa_replaced(function):
    original = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        return function(original, query, key, value, attn_mask, dropout_p, is_causal, kwargs)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def check_family(denoiser) -> None:
    if denoiser.family not in CACHED_FAMILIES:
        raise TypeError(
            f"the KV cache is implemented for the LLaDA family {CACHED_FAMILIES}, not for a "
            f"{denoiser.family} backbone; sample without cache"
        )


def forward_with_cache(denoiser, x: torch.Tensor, attention_mask=None):
    """The denoiser's logits (B, L, V) and an `HFKVCache` of every layer's keys and values."""
    check_family(denoiser)
    keys, values = [], []

    def record(original, q, k, v, mask, dropout_p, is_causal, kwargs):
        keys.append(k)
        values.append(v)
        return original(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    with _sdpa_replaced(record):
        logits = denoiser(x, attention_mask)
    _check_calls(denoiser, len(keys))
    return logits, HFKVCache(x, tuple(keys), tuple(values))


def forward_from_cache(denoiser, tokens, cache: HFKVCache, *, start: int, attention_mask=None):
    """Logits (B, w, V) of `tokens` at positions [start, start + w) against `cache`."""
    check_family(denoiser)
    if not isinstance(cache, HFKVCache):
        raise ValueError("cache must be the HFKVCache that forward_with_cache returned")
    rows, width = tokens.shape
    stop = start + width
    if not 0 <= start <= stop <= cache.length or rows != cache.tokens.shape[0]:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} at start={start} do not fit a cache of "
            f"{cache.tokens.shape[0]} rows of length {cache.length}"
        )
    begin = start - 1 if denoiser.shift and start > 0 else start  # Dream: one position early
    run = torch.cat([cache.tokens[:, begin:start], tokens], dim=1)
    device = tokens.device
    allowed = allowed_keys(
        attention_mask,
        (rows, cache.length),
        attention=denoiser.attention,
        block_size=denoiser.block_size,
        device=device,
    )
    allowed = None if allowed is None else allowed[:, None, begin:stop]  # (B, 1, w', L)
    calls = [0]

    def window(original, q, k, v, mask, dropout_p, is_causal, kwargs):
        index = calls[0]
        calls[0] += 1
        if index >= len(cache.keys):
            raise TypeError("the model called attention more often than when the cache was built")
        keys, values = cache.keys[index], cache.values[index]
        k = torch.cat([keys[:, :, :begin], k, keys[:, :, stop:]], dim=2)
        v = torch.cat([values[:, :, :begin], v, values[:, :, stop:]], dim=2)
        additive = None
        if allowed is not None:
            low = torch.finfo(q.dtype).min
            additive = torch.zeros(allowed.shape, dtype=q.dtype, device=device)
            additive = additive.masked_fill(~allowed, low)
        return original(q, k, v, attn_mask=additive, dropout_p=dropout_p, is_causal=False, **kwargs)

    inputs = {}
    if denoiser.family != "llada":  # the HF-style families take positions
        positions = torch.arange(begin, stop, device=device)
        inputs["position_ids"] = positions[None].expand(rows, -1)
    if denoiser.mask_style == "additive":  # never let the model build a (causal) mask
        dtype = denoiser._compute_dtype()
        inputs["attention_mask"] = torch.zeros(rows, 1, run.shape[1], run.shape[1], dtype=dtype)
    placed = _llada_rotary_at(denoiser, begin) if denoiser.family == "llada" else None
    with _sdpa_replaced(window), placed or contextlib.nullcontext():
        out = denoiser.hf(input_ids=run, **inputs)
    _check_calls(denoiser, calls[0])
    logits = denoiser.cut_vocab(out.logits if hasattr(out, "logits") else out[0])
    if denoiser.shift:
        logits = logits[:, :-1] if begin < start else torch.cat([logits[:, :1], logits[:, :-1]], 1)
    return logits


@contextlib.contextmanager
def _llada_rotary_at(denoiser, begin: int):
    """LLaDA's per-block `rotary_emb(q, k)` applied at positions [begin, begin + w) of a window.

    q, k: (B, H, w, hd). Each call gets `begin` zero rows in front of q and k (B, H, begin + w,
    hd), so the model's own rotary rotates position begin + i by its table's angle for
    begin + i, exactly as in the full forward (one rotation, the same float32 angles); the
    front rows are dropped. The padding costs O((begin + w) hd) per layer, no more than the
    window's keys cost anyway. A block without `rotary_emb` (a config without RoPE) is left as
    it is; a rotary that is not called once per layer is refused with a TypeError.
    """
    rotaries = [getattr(layer, "rotary_emb", None) for layer in denoiser.layers]
    rotaries = [r for r in rotaries if r is not None]
    calls = [0]

    def at_positions(original):
        def forward(q, k, *args, **kwargs):
            calls[0] += 1
            q, k = original(_zeros_before(q, begin), _zeros_before(k, begin), *args, **kwargs)
            return q[..., begin:, :], k[..., begin:, :]

        return forward

    saved = [rotary.__dict__.get("forward") for rotary in rotaries]  # e.g. accelerate's hooks
    for rotary in rotaries:
        rotary.forward = at_positions(rotary.forward)
    try:
        yield
    finally:
        for rotary, forward in zip(rotaries, saved):
            if forward is None:
                del rotary.forward  # the class's forward again
            else:
                rotary.forward = forward
    if rotaries and calls[0] != len(denoiser.layers):
        raise TypeError(
            f"cannot place LLaDA's rotary at the window's positions: rotary_emb was called "
            f"{calls[0]} times for {len(denoiser.layers)} layers"
        )


def _zeros_before(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (..., n, d) with `rows` zero rows in front along dim -2: (..., rows + n, d)."""
    if rows == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], rows, t.shape[-1]), t], dim=-2)


def _check_calls(denoiser, calls: int) -> None:
    if calls != len(denoiser.layers):
        raise TypeError(
            f"the KV cache needs one scaled_dot_product_attention call per layer; the "
            f"{denoiser.family} model made {calls} for {len(denoiser.layers)} layers (an eager "
            "attention implementation? load it with attn_implementation='sdpa')"
        )
