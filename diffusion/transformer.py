"""A small reference denoiser: a bidirectional pre-norm transformer in the LLaMA/LLaDA layout.

RMSNorm, rotary position embeddings (RoFormer, Su et al. 2021), SwiGLU feed-forward (Shazeer
2020) with projections named `gate_proj`, `up_proj`, `down_proj` (so fast weights attach to them
as MemDLM attaches them to LLaDA), and no time conditioning (MDLM and RADD show a masked
diffusion denoiser does not need t).

Padding: `attention_mask` (B, L) bool, True = real token, is a key padding mask, and rotary
positions are `cumsum(mask) - 1`, so a left-padded row gets the same positions, and the same
logits on its real tokens, as the row alone. A row with no real token at all gives NaN (every key
is masked). A (B, L, L) bool `attention_mask` says which keys each query may attend to (e.g.
LLaDA2.x's block-causal attention); positions are then 0..L-1.

KV cache: `forward_with_cache` / `forward_from_cache` implement `diffusion.CachedDenoiser`, which
`diffusion.generate(..., cache="prefix" | "dual")` uses (Fast-dLLM's block-wise cache).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["RMSNorm", "Transformer", "apply_rotary", "rotary_tables"]

ATTN_BACKENDS = (None, "math")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_hi = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x_hi * torch.rsqrt(x_hi.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_tables(max_seq_len: int, head_dim: int, base: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles pos * base^(-2j / head_dim).

    Returns two float32 tensors of shape (max_seq_len, head_dim / 2).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x_j, x_{j + d/2}) of x (..., L, d) by the angles whose cos/sin are given
    with shape broadcastable to (..., L, d/2). Scores q.k then depend on relative position only."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with rotary positions and a key padding mask."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        return self.mix(q, k, v, key_mask)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys (after rotary) and values, each (B, H, L, hd)."""
        batch, length, _ = x.shape

        def heads(proj: nn.Linear) -> Tensor:  # (B, L, D) -> (B, H, L, hd)
            return proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj), cos, sin)
        k = apply_rotary(heads(self.k_proj), cos, sin)
        return q, k, heads(self.v_proj)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
        """Attention of the queries (B, H, Lq, hd) over the keys and values (B, H, Lk, hd),
        then the output projection: (B, Lq, D)."""
        batch, _, length, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        return self.feed_forward(self.attend(h, cos, sin, key_mask))

    def attend(self, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        """The attention sub-block: h + attn(norm(h))."""
        return h + self.attn(self.attn_norm(h), cos, sin, key_mask)

    def feed_forward(self, h: Tensor) -> Tensor:
        """The feed-forward sub-block: h + mlp(norm(h))."""
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """Bidirectional transformer denoiser: tokens (B, L) -> logits (B, L, V).

    Args:
        vocab_size: V, including the mask token.
        d_model, n_layers, n_heads, d_ff: sizes; d_model / n_heads must be an even integer.
        max_seq_len: longest sequence; the rotary tables are built once for it.
        tie_embeddings: share the embedding matrix with `lm_head`.
        attn_backend: None (PyTorch chooses the SDPA kernel) or "math", which forces
            `sdpa_kernel(SDPBackend.MATH)` so that second-order gradients through attention work
            on CPU. It is a plain attribute and may be changed at any time.

    Submodules: `embed`, `layers` (ModuleList of blocks with `attn_norm`, `attn.{q,k,v,o}_proj`,
    `mlp_norm`, `mlp.{gate,up,down}_proj`), `norm`, `lm_head`.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 256,
        max_seq_len: int = 512,
        tie_embeddings: bool = False,
        attn_backend: str | None = None,
    ):
        super().__init__()
        _check_sizes(vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.attn_backend = attn_backend
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        cos, sin = rotary_tables(max_seq_len, d_model // n_heads)
        # Built once; non-persistent so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(n_layers)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def attn_backend(self) -> str | None:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str | None) -> None:
        if value not in ATTN_BACKENDS:
            raise ValueError(
                f"Transformer: attn_backend must be one of {ATTN_BACKENDS}, got {value!r}"
            )
        self._attn_backend = value

    def _init_weights(self, n_layers: int) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers).
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = (
                0.02 / math.sqrt(2 * n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else 0.02
            )
            nn.init.normal_(param, std=std)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) for tokens x (B, L); attention_mask (B, L) bool, True = real token."""
        return self.logits_from(
            self.hidden_states(x, attention_mask, upto=0), attention_mask, start=0
        )

    def forward_with_cache(
        self, x: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, tuple[tuple[Tensor, Tensor], ...]]:
        """The forward, plus every layer's keys (after rotary) and values, each (B, H, L, hd):
        the `diffusion.CachedDenoiser` protocol (docs/diffusion.md, "KV cache")."""
        self._check_inputs(x, attention_mask)
        cos, sin, mask = self._positions(attention_mask, x.shape[1])
        h, cache = self.embed(x), []
        with self._attention_context():
            for layer in self.layers:
                q, k, v = layer.attn.qkv(layer.attn_norm(h), cos, sin)
                cache.append((k, v))
                h = layer.feed_forward(h + layer.attn.mix(q, k, v, mask))
        return self.lm_head(self.norm(h)), tuple(cache)

    def forward_from_cache(
        self,
        tokens: Tensor,
        cache: tuple[tuple[Tensor, Tensor], ...],
        *,
        start: int,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, w, V) of `tokens` (B, w) at positions [start, start + w) of the sequence
        `cache` came from (`forward_with_cache`): at every layer they attend to the cached keys
        and values with their own positions' replaced by theirs. `attention_mask`: the full
        (B, L) or (B, L, L) mask of that sequence."""
        if not isinstance(cache, tuple) or len(cache) != len(self.layers):
            raise ValueError(
                f"Transformer.forward_from_cache: cache must be the tuple of {len(self.layers)} "
                "(keys, values) pairs that forward_with_cache returned"
            )
        self._check_inputs(tokens, None)
        batch, width = tokens.shape
        length = cache[0][0].shape[2]
        if (
            isinstance(start, bool)
            or not isinstance(start, int)
            or not 0 <= start <= length - width
            or cache[0][0].shape[0] != batch
        ):
            raise ValueError(
                f"Transformer.forward_from_cache: tokens of shape {tuple(tokens.shape)} at "
                f"start={start!r} do not fit a cache of {cache[0][0].shape[0]} rows of "
                f"length {length}"
            )
        if attention_mask is not None:
            self._check_mask(attention_mask, batch, length)
        stop = start + width
        cos, sin, mask = self._positions(attention_mask, length)
        if cos.dim() == 2:  # positions 0..L-1
            cos, sin = cos[start:stop], sin[start:stop]
        else:  # per row, from the padding mask
            cos, sin = cos[:, :, start:stop], sin[:, :, start:stop]
        if mask is not None and mask.shape[2] != 1:  # query-by-key: the window's rows
            mask = mask[:, :, start:stop]
        h = self.embed(tokens)
        with self._attention_context():
            for layer, (keys, values) in zip(self.layers, cache):
                q, k, v = layer.attn.qkv(layer.attn_norm(h), cos, sin)
                k = torch.cat([keys[:, :, :start], k, keys[:, :, stop:]], dim=2)
                v = torch.cat([values[:, :, :start], v, values[:, :, stop:]], dim=2)
                h = layer.feed_forward(h + layer.attn.mix(q, k, v, mask))
        return self.lm_head(self.norm(h))

    def hidden_states(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        *,
        upto: int,
        mid_layer: bool = False,
    ) -> Tensor:
        """Embedding followed by `layers[:upto]`: (B, L) tokens -> (B, L, D).

        mid_layer: also run the attention sub-block of `layers[upto]`, stopping before its
        feed-forward (a caller whose per-step changes live only in that FFN, as fast weights on
        `mlp.*_proj`, computes the attention once and reuses it).
        """
        self._check_inputs(x, attention_mask)
        self._check_split("upto", upto, mid_layer)
        return self._run(self.embed(x), attention_mask, 0, 2 * upto + mid_layer)

    def logits_from(
        self,
        h: Tensor,
        attention_mask: Tensor | None = None,
        *,
        start: int,
        mid_layer: bool = False,
    ) -> Tensor:
        """`layers[start:]`, the final norm and `lm_head`: (B, L, D) -> (B, L, V).

        mid_layer: `h` comes from `hidden_states(..., upto=start, mid_layer=True)`; start with
        the feed-forward sub-block of `layers[start]`.
        """
        return self.lm_head(self.features_from(h, attention_mask, start=start, mid_layer=mid_layer))

    def features_from(
        self,
        h: Tensor,
        attention_mask: Tensor | None = None,
        *,
        start: int,
        mid_layer: bool = False,
    ) -> Tensor:
        """`layers[start:]` and the final norm: (B, L, D) -> (B, L, D), the input of `lm_head`.

        With `lm_head.weight` this feeds `diffusion.masked_diffusion_loss_from_hidden`, which
        never forms the (B, L, V) logits. mid_layer: as in `logits_from`.
        """
        self._check_split("start", start, mid_layer)
        if h.dim() != 3 or h.shape[1] > self.max_seq_len:
            raise ValueError(
                f"Transformer.features_from: h must be (B, L, D) with L <= {self.max_seq_len}, "
                f"got shape {tuple(h.shape)}"
            )
        return self.norm(self._run(h, attention_mask, 2 * start + mid_layer, 2 * len(self.layers)))

    def _check_split(self, name: str, index: int, mid_layer: bool) -> None:
        self._check_layer_index(name, index)
        if mid_layer and index >= len(self.layers):
            raise ValueError(
                f"Transformer: mid_layer=True needs {name} < n_layers={len(self.layers)}, "
                f"got {name}={index}"
            )

    def _run(self, h: Tensor, attention_mask: Tensor | None, start: int, stop: int) -> Tensor:
        """Sub-blocks [start, stop) of the network: sub-block 2i is layer i's attention,
        2i + 1 its feed-forward."""
        if start == stop:
            return h
        cos, sin, key_mask = self._positions(attention_mask, h.shape[1])
        index = start
        with self._attention_context():
            while index < stop:
                layer = self.layers[index // 2]
                if index % 2 == 1:  # starting inside a layer: its feed-forward only
                    h, index = layer.feed_forward(h), index + 1
                elif index + 1 < stop:  # a whole layer
                    h, index = layer(h, cos, sin, key_mask), index + 2
                else:  # stopping inside a layer: its attention only
                    h, index = layer.attend(h, cos, sin, key_mask), index + 1
        return h

    def _positions(self, attention_mask: Tensor | None, length: int):
        """Rotary cos/sin broadcastable to (B, H, L, hd/2) and the SDPA mask: (B, 1, 1, L) for a
        key padding mask, (B, 1, L, L) for a query-by-key mask (positions 0..L-1 then)."""
        if attention_mask is None:
            return self.rope_cos[:length], self.rope_sin[:length], None
        if attention_mask.dim() == 3:
            return self.rope_cos[:length], self.rope_sin[:length], attention_mask[:, None]
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        return cos, sin, attention_mask[:, None, None, :]

    def _attention_context(self):
        if self._attn_backend == "math":
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def _check_inputs(self, x: Tensor, attention_mask: Tensor | None) -> None:
        if (
            not isinstance(x, Tensor)
            or x.dim() != 2
            or x.is_floating_point()
            or x.dtype == torch.bool
        ):
            raise ValueError(
                f"Transformer: x must be a (B, L) integer tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if x.shape[1] > self.max_seq_len:
            raise ValueError(
                f"Transformer: sequence length {x.shape[1]} exceeds max_seq_len={self.max_seq_len}"
            )
        if attention_mask is not None:
            self._check_mask(attention_mask, x.shape[0], x.shape[1])

    def _check_mask(self, attention_mask: Tensor, batch: int, length: int) -> None:
        shapes = ((batch, length), (batch, length, length))
        if not isinstance(attention_mask, Tensor) or (
            tuple(attention_mask.shape) not in shapes or attention_mask.dtype != torch.bool
        ):
            got = (
                f"{attention_mask.dtype} of shape {tuple(attention_mask.shape)}"
                if isinstance(attention_mask, Tensor)
                else type(attention_mask).__name__
            )
            raise ValueError(
                f"Transformer: attention_mask must be a bool tensor of shape {shapes[0]} (key "
                f"padding) or {shapes[1]} (query by key), got {got}"
            )

    def _check_layer_index(self, name: str, value: int) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 <= value <= len(self.layers)
        ):
            raise ValueError(
                f"Transformer: {name} must be an int in [0, {len(self.layers)}], got {value!r}"
            )


def _check_sizes(vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len) -> None:
    sizes = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        d_ff=d_ff,
        max_seq_len=max_seq_len,
    )
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Transformer: {name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"Transformer: {name} must be >= 1, got {value}")
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ValueError(
            f"Transformer: d_model / n_heads must be an even integer (rotary pairs), got "
            f"d_model={d_model}, n_heads={n_heads}"
        )
