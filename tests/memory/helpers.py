"""A small bidirectional SwiGLU transformer with the reference module layout.

`model.layers[i].mlp.{gate,up,down}_proj` and `model.layers[i].attn.{q,k,v,o}_proj` are
`nn.Linear`; `model(tokens)` maps (B, L) token ids to (B, L, V) logits. Attention is written
by hand (no SDPA) so that any order of derivative works on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        b, l, d = x.shape
        split = lambda t: t.view(b, l, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, L, L)
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, l, d)
        return self.o_proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=13, dim=16, heads=2, hidden=24, num_layers=4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(num_layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def tiny_model(dtype=torch.float32, seed=0, **sizes) -> TinyTransformer:
    """A seeded TinyTransformer in eval mode, cast to `dtype`."""
    torch.manual_seed(seed)
    return TinyTransformer(**sizes).to(dtype).eval()


def tokens(batch: int, length: int, vocab: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(state: dict[str, torch.Tensor], seed: int = 2, scale: float = 0.3):
    """The same keys filled with random values, so that B A is not zero (init has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}


class Associative(nn.Module):
    """The simplest associative memory read-out: y = W k, with a random (not storing) W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, keys):
        return self.proj(keys)


def association_task(num_pairs: int, dim: int, batch: int | None = None, seed: int = 0):
    """Orthonormal keys and random unit values, (N, d) each or (B, N, d) with `batch`."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    square = torch.randn(lead + (dim, dim), generator=gen, dtype=torch.float64)
    keys = torch.linalg.qr(square)[0][..., :num_pairs, :]  # rows of an orthogonal matrix
    values = F.normalize(torch.randn(lead + (num_pairs, dim), generator=gen), dim=-1)
    return keys, values.to(torch.float64)


def recall_loss(pred, values):
    """0.5 * ||pred - value||^2, averaged over pairs and summed over a leading batch dim."""
    per_pair = 0.5 * ((pred - values) ** 2).sum(-1)
    return per_pair.mean(-1).sum()


def recall_accuracy(pred, values):
    """Share of keys whose prediction is closest (inner product) to its own value."""
    scores = pred @ values.transpose(-1, -2)  # (..., N, N)
    target = torch.arange(values.shape[-2])
    return (scores.argmax(-1) == target).double().mean().item()


def sgd_steps(memory, state, loss_of_state, lr, steps):
    """`steps` plain SGD steps on the state; returns the list of states [s0, ..., s_steps]."""
    states = [state]
    for _ in range(steps):
        grads = torch.func.grad(lambda s: loss_of_state(memory, s))(states[-1])
        states.append({k: v - lr * grads[k] for k, v in states[-1].items()})
    return states
