"""Cost of ``bl.solve(mode=bl.FirstOrder())`` against hand-written inner loops (MemDLM's case).

Workload (MemDLM-shaped, float32): a two-layer MLP block (D -> H -> GELU -> D) whose weights
require grad (the outer model, closed over by the inner loss, ``meta=None``), with a rank-32
LoRA fast weight (A: 32xH, B: Dx32, B = 0 at start) on the second layer read through a forward
hook; MSE loss; ``chain(clip_per_tensor(1.0), sgd(0.1))``; K = 2 (MemDLM) and K = 8 steps.
Two sizes: "small" (D 64, H 256, 8 x 16 tokens: per-step Python overhead matters) and
"medium" (D 256, H 1024, 16 x 64 tokens: the matmuls dominate).

  * bilevel FirstOrder: ``bl.solve(..., mode=bl.FirstOrder())`` (eager: ``torch.autograd.grad``);
  * autograd by hand:   the loop one would write: detach, ``requires_grad_``,
    ``torch.autograd.grad``, per-tensor clip and SGD under ``no_grad``;
  * torch.func by hand: the same loop with ``torch.func.grad_and_value`` (the functional path
    bilevel uses inside vmap/grad), to show why eager first-order mode does not use it.

    OMP_NUM_THREADS=1 python benchmarks/bench_bilevel_first_order.py [--repeats 40]
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_bilevel_first_order.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

RANK, LR, CLIP = 32, 0.1, 1.0
SIZES = {"small": (8, 16, 64, 256), "medium": (16, 64, 256, 1024)}  # batch, tokens, D, H


class Block(nn.Module):
    """x -> W2 gelu(W1 x) + (B A) gelu(W1 x): the fast weight is added by a forward hook."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.fast = None
        self.down.register_forward_hook(self._add_fast)

    def _add_fast(self, module, inputs, out):
        if self.fast is None:
            return out
        return out + (inputs[0] @ self.fast["A"].T) @ self.fast["B"].T

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def make_problem(size: str = "small", seed: int = 0):
    batch, tokens, dim, hidden = SIZES[size]
    torch.manual_seed(seed)
    model = Block(dim, hidden)
    x, y = torch.randn(batch, tokens, dim), torch.randn(batch, tokens, dim)
    fast0 = {"A": torch.randn(RANK, hidden) / hidden**0.5, "B": torch.zeros(dim, RANK)}

    def inner(fast, meta, data):
        model.fast = fast
        try:
            return ((model(data[0]) - data[1]) ** 2).mean()
        finally:
            model.fast = None

    return inner, fast0, (x, y)


def _clip(g):
    return g * (CLIP / (torch.linalg.vector_norm(g) + 1e-12)).clamp(max=1.0)


OPTIMIZER = bl.chain(bl.clip_per_tensor(CLIP), bl.sgd(LR))  # built once, as a user would


def bilevel_first_order(inner, fast0, data, steps):
    optimizer = OPTIMIZER
    return bl.solve(
        inner, fast0, None, optimizer=optimizer, steps=steps, mode=bl.FirstOrder(), data=data
    )


def autograd_by_hand(inner, fast0, data, steps):
    fast = fast0
    for _ in range(steps):
        leaves = {k: v.detach().requires_grad_() for k, v in fast.items()}
        loss = inner(leaves, None, data)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            fast = {k: v - LR * _clip(g) for (k, v), g in zip(leaves.items(), grads)}
    return fast


def func_by_hand(inner, fast0, data, steps):
    grad_fn = torch.func.grad_and_value(lambda f: inner(f, None, data))
    fast = fast0
    with torch.no_grad():
        for _ in range(steps):
            grads, _ = grad_fn(fast)
            fast = {k: v - LR * _clip(grads[k]) for k, v in fast.items()}
    return fast


IMPLEMENTATIONS = {
    "bilevel FirstOrder": bilevel_first_order,
    "autograd by hand": autograd_by_hand,
    "torch.func by hand": func_by_hand,
}


def check_agreement(steps: int = 2) -> float:
    inner, fast0, data = make_problem("medium")
    reference = autograd_by_hand(inner, fast0, data, steps)
    worst = 0.0
    for name, fn in IMPLEMENTATIONS.items():
        got = fn(inner, fast0, data, steps)
        for k, want in reference.items():
            rel = float((got[k] - want).abs().max() / want.abs().max())
            if rel > 1e-5:
                raise AssertionError(f"{name} disagrees with the hand-written loop: {rel:.1e}")
            worst = max(worst, rel)
    return worst


# ----------------------------------------------------------------------------- pytest mode
def test_agreement():
    assert check_agreement() < 1e-5


def _bench(benchmark, name, steps):
    inner, fast0, data = make_problem("small")
    benchmark.group = f"bilevel first-order inner loop, small, K={steps}"
    benchmark.pedantic(
        IMPLEMENTATIONS[name], args=(inner, fast0, data, steps), rounds=20, warmup_rounds=2
    )


def test_bilevel_first_order_k2(benchmark):
    _bench(benchmark, "bilevel FirstOrder", 2)


def test_autograd_by_hand_k2(benchmark):
    _bench(benchmark, "autograd by hand", 2)


def test_func_by_hand_k2(benchmark):
    _bench(benchmark, "torch.func by hand", 2)


# ----------------------------------------------------------------------------- script mode
def interleaved_medians(size: str, steps: int, repeats: int) -> dict[str, float]:
    inner, fast0, data = make_problem(size)
    for fn in IMPLEMENTATIONS.values():
        fn(inner, fast0, data, steps)
    times = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(repeats):
        for name, fn in IMPLEMENTATIONS.items():
            start = time.perf_counter()
            fn(inner, fast0, data, steps)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    worst = check_agreement()
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"threads {torch.get_num_threads()}, repeats {args.repeats}; max rel. deviation {worst:.1e}"
    )
    print(f"{'size':<7} {'K':>2} {'implementation':<20} {'ms/step':>8} {'x autograd by hand':>19}")
    for size in SIZES:
        for steps in (2, 8):
            medians = interleaved_medians(size, steps, args.repeats)
            base = medians["autograd by hand"]
            for name, seconds in medians.items():
                print(
                    f"{size:<7} {steps:>2} {name:<20} {seconds / steps * 1e3:>8.3f} "
                    f"{seconds / base:>19.3f}"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
