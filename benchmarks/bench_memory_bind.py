"""What scoping the hooks to `bind` costs: hooks installed on entering `with mem.bind(state):`
and removed on leaving, against hooks that stay on the model for the memory's life (the
design before issue 30).

Workload: `diffusion.Transformer` at the MemDLM recipe's cpu-tiny size (d_model 128, 4 layers,
d_ff 256), MemDLM's targets (the last layer's FFN projections), rank 8, batch 16,
128 tokens; forward only, no gradient (the cheapest forward, where a fixed cost shows most).
  * "bound, scoped":    N x (enter bind, forward, leave)      -- this design;
  * "bound, kept":      enter once, N x forward, leave once    -- hooks kept, as before;
  * "unbound, no hook": N x forward of the bare model          -- this design outside bind;
  * "unbound, no-op hook": N x forward with a hook that returns None on every target, which is
    what the model carried outside `bind` before.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_bind.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import platform
import statistics
import time

import torch

import diffusion as dd
import memory as mm

BATCH, TOKENS, RANK, CALLS, REPEATS = 16, 128, 8, 20, 15
MODEL = dict(vocab_size=96, d_model=128, n_layers=4, n_heads=4, d_ff=256, max_seq_len=TOKENS)


def _median_per_call(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / CALLS)
    return statistics.median(times)


def measure() -> dict[str, float]:
    torch.manual_seed(0)
    model = dd.Transformer(**MODEL).eval()
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.1), rank=RANK, alpha=2.0 * RANK)
    state = mem.init()
    x = torch.randint(0, 96, (BATCH, TOKENS))

    def scoped():
        for _ in range(CALLS):
            with mem.bind(state):
                model(x)

    def kept():
        with mem.bind(state):
            for _ in range(CALLS):
                model(x)

    def bare():
        for _ in range(CALLS):
            model(x)

    def bind_only():
        for _ in range(CALLS):
            with mem.bind(state):
                pass

    with torch.no_grad():
        out = {
            "bound, scoped": _median_per_call(scoped),
            "bound, kept": _median_per_call(kept),
            "bind + leave alone": _median_per_call(bind_only),
            "unbound, no hook": _median_per_call(bare),
        }
        handles = [
            model.get_submodule(t).register_forward_hook(lambda *a: None) for t in mem.targets
        ]
        out["unbound, no-op hook"] = _median_per_call(bare)
        for h in handles:
            h.remove()
    return out


def main() -> None:
    times = measure()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); batch {BATCH}, {TOKENS} tokens, rank {RANK}"
    )
    print("| case | ms per call | ratio |\n|---|---|---|")
    pairs = {"bound, scoped": "bound, kept", "unbound, no hook": "unbound, no-op hook"}
    for case, ms in times.items():
        base = pairs.get(case)
        ratio = f"{ms / times[base]:.3f}x vs {base}" if base else ""
        print(f"| {case} | {1e3 * ms:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
