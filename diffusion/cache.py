"""The model side of `generate(..., cache=...)`: Fast-dLLM's block-wise approximate KV cache.

A denoiser that implements `CachedDenoiser` (two methods) can be sampled with a cache:

    logits, cache = model.forward_with_cache(x, attention_mask=None)
        The ordinary forward on the whole sequence x (B, L): logits (B, L, V), plus an opaque
        `cache` holding every layer's keys and values (after rotary) at all L positions.
    logits = model.forward_from_cache(tokens, cache, start=s, attention_mask=None)
        `tokens` (B, w) stand at positions [s, s + w) of that sequence. At every layer their
        queries, keys and values are computed afresh, and they attend to the keys and values of
        the cache with positions [s, s + w) replaced by their own. Returns logits (B, w, V).
        `attention_mask` is the same (B, L) mask (or (B, L, L) query-by-key mask) given to
        `forward_with_cache`; rotary positions come from it exactly as in the full forward.

With a cache built from the current sequence, `forward_from_cache` equals the full forward on the
window up to rounding (tested). `generate` uses it as Fast-dLLM v1 does (arXiv 2505.22618):

    "prefix"  the block's first step is a full forward that builds the cache; the later steps of
              the block run the window [block start, end of sequence), so only the keys and
              values of the prompt and of the finished blocks come from the cache.
    "dual"    the same, with the window cut to the current block: the masked later blocks'
              keys and values also come from the cache built at the block's start.

Both are approximations for a bidirectional model (the cached keys and values do not see the
block's new commits); on a model whose attention is block-causal (LLaDA2.x: bidirectional inside
blocks, causal across them) the dual cache is exact. Fast weights bound to the model's linear
layers (`memory`) act in both calls, so the cached and the fresh positions see the same weights.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["CACHE_MODES", "CachedDenoiser", "supports_cache"]

CACHE_MODES = (None, "prefix", "dual")


@runtime_checkable
class CachedDenoiser(Protocol):
    """A denoiser `generate` can run with `cache="prefix"` or `"dual"` (module docstring)."""

    def forward_with_cache(
        self, x: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]: ...

    def forward_from_cache(
        self, tokens: Tensor, cache: Any, *, start: int, attention_mask: Tensor | None = None
    ) -> Tensor: ...


def supports_cache(model) -> bool:
    """True when `model` has both methods of `CachedDenoiser`."""
    return callable(getattr(model, "forward_with_cache", None)) and callable(
        getattr(model, "forward_from_cache", None)
    )
