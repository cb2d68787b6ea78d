"""What the scoped binding costs: entering and leaving `with mem.bind(state):` (it fills and
empties the slot the memory's hooks read), and a memory's hooks on an unbound forward, against
the bare model.

Workload: `diffusion.Transformer` at the MemDLM recipe's cpu-tiny size (d_model 128, 4 layers,
d_ff 256), MemDLM's targets (the last layer's FFN projections), rank 8, batch 16, 64 tokens;
forward only, no gradient (the cheapest forward, where a fixed cost shows most):
  * "bound forward, bind per call": N x (enter bind, forward, leave);
  * "bound forward, one bind":      enter once, N x forward, leave once;
  * "bind + leave alone":           N x (enter, leave), no forward;
  * "unbound, memory attached":     N x forward with the memory alive (hooks return None);
  * "unbound, memory dropped":      N x forward after the memory is garbage-collected.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_bind.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gc
import platform
import statistics
import time

import torch

import diffusion as dd
import memory as mm

BATCH, TOKENS, RANK, CALLS, REPEATS = 16, 64, 8, 10, 9
MODEL = dict(vocab_size=96, d_model=128, n_layers=4, n_heads=4, d_ff=256, max_seq_len=TOKENS)


def _median_per_call(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / CALLS)
    return statistics.median(times)


def _with_memory(model, x) -> dict[str, float]:
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.1), rank=RANK, alpha=2.0 * RANK)
    state = mem.init()

    def bind_per_call():
        for _ in range(CALLS):
            with mem.bind(state):
                model(x)

    def one_bind():
        with mem.bind(state):
            for _ in range(CALLS):
                model(x)

    def bind_only():
        for _ in range(CALLS):
            with mem.bind(state):
                pass

    return {
        "bound forward, bind per call": _median_per_call(bind_per_call),
        "bound forward, one bind": _median_per_call(one_bind),
        "bind + leave alone": _median_per_call(bind_only),
        "unbound, memory attached": _median_per_call(lambda: _forwards(model, x)),
    }


def _forwards(model, x) -> None:
    for _ in range(CALLS):
        model(x)


def measure() -> dict[str, float]:
    torch.manual_seed(0)
    model = dd.Transformer(**MODEL).eval()
    x = torch.randint(0, 96, (BATCH, TOKENS))
    with torch.no_grad():
        out = _with_memory(model, x)
        gc.collect()  # the memory is gone: so are its hooks
        assert not any(m._forward_hooks for m in model.modules())
        out["unbound, memory dropped"] = _median_per_call(lambda: _forwards(model, x))
    return out


def main() -> None:
    times = measure()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); batch {BATCH}, {TOKENS} tokens, rank {RANK}"
    )
    print("| case | ms per call | ratio |\n|---|---|---|")
    pairs = {
        "bound forward, bind per call": "bound forward, one bind",
        "unbound, memory attached": "unbound, memory dropped",
    }
    for case, ms in times.items():
        base = pairs.get(case)
        ratio = f"{ms / times[base]:.3f}x vs {base}" if base else ""
        print(f"| {case} | {1e3 * ms:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
