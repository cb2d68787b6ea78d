"""Per-sample LoRA fast weights: batched matmuls vs a Python loop vs torch.func.vmap, and the
overhead of a bound forward over the bare model.

Workloads, all at batch 16 with one rank-32 LoRA per sample, each timed forward only and
forward + backward to the state (the work of one inner SGD step):
  * "linear T=n": one nn.Linear(256, 256) with its LoRA, n tokens per sample;
  * "transformer T=n": `diffusion.Transformer` (d_model 128, 4 layers, d_ff 256; the MemDLM
    recipe's default size) with MemDLM's targets (FFN projections of the last 10% of layers,
    at least one), alpha 64, n tokens per sample.
The loop pays Python and small-matmul overhead per sample, so the batched path's advantage is
largest when the work per sample is small and shrinks toward 1x when the matmuls dominate.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_lora.py          # table of medians and ratios
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_memory_lora.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import platform
import statistics
import time

import torch
from torch import nn

import diffusion as dd
import memory as mm

BATCH, TOKENS, RANK = 16, 64, 32


# ------------------------------------------------------------------------------ workloads
class OneLinear(nn.Module):
    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)


def linear_workload(tokens: int = TOKENS):
    torch.manual_seed(0)
    model = OneLinear().eval()
    mem = mm.FastLoRA(model, ["proj"], rank=RANK, alpha=64.0)
    x = torch.randn(BATCH, tokens, 256)
    return model, mem, x


def transformer_workload(tokens: int = TOKENS, attach: bool = True):
    torch.manual_seed(0)
    model = dd.Transformer(256, d_model=128, n_layers=4, n_heads=4, d_ff=256, max_seq_len=TOKENS)
    model = model.eval()
    mem = mm.FastLoRA(model, mm.last_layers(model), rank=RANK, alpha=64.0) if attach else None
    x = torch.randint(256, (BATCH, tokens))
    return model, mem, x


def trained_state(mem, batch_size):
    """A per-sample state with B != 0, as after an inner step (init has B = 0)."""
    gen = torch.Generator().manual_seed(1)
    state = mem.init(batch_size=batch_size, generator=gen)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


# ------------------------------------------------------------------- the three strategies
def per_sample_strategies(model, mem, x):
    """name -> function(state) computing the outputs of every sample with its own LoRA."""

    def batched(state):
        with mem.bind(state):
            return model(x)

    def loop(state):
        outs = []
        for b in range(x.shape[0]):
            with mem.bind({k: v[b] for k, v in state.items()}):
                outs.append(model(x[b : b + 1]))
        return torch.cat(outs)

    def one_sample(state, xb):  # unbatched state inside vmap
        with mem.bind(state):
            return model(xb[None])[0]

    vmapped = torch.func.vmap(one_sample)

    def vmap(state):
        return vmapped(state, x)

    return {"batched": batched, "loop": loop, "vmap": vmap}


def with_backward(forward):
    """forward + backward of a scalar to the state (what an inner SGD step costs)."""

    def run(state):
        leaves = {k: v.detach().requires_grad_() for k, v in state.items()}
        out = forward(leaves)
        return torch.autograd.grad(out.float().square().mean(), list(leaves.values()))

    return run


def bound_forward(model, mem, x, state):
    def run():
        with mem.bind(state):
            return model(x)

    return run


def overhead_variants():
    """The bare model (no hooks at all) and the same weights with a FastLoRA attached:
    unbound, bound to a shared state, bound to a per-sample state."""
    bare, _, x = transformer_workload(attach=False)  # same seed, same weights
    model, mem, _ = transformer_workload()
    return {
        "bare model": lambda: bare(x),
        "attached, unbound": lambda: model(x),
        "bound shared": bound_forward(model, mem, x, trained_state(mem, None)),
        "bound per-sample": bound_forward(model, mem, x, trained_state(mem, BATCH)),
    }


# ------------------------------------------------------------------------------- timing
def median_times(functions: dict, rounds: int = 21, inner: int = 3, warmup: int = 2) -> dict:
    """Median seconds per call, rounds interleaved across functions so load hits all alike.

    Measured as this process's CPU time: with one thread it equals the wall time on an idle
    machine, and unlike the wall time it does not count the time other processes on the shared
    cores hold the CPU.
    """
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.process_time()
            for _ in range(inner):
                fn()
            samples[name].append((time.process_time() - start) / inner)
    return {name: statistics.median(times) for name, times in samples.items()}


def check_agreement(strategies, state) -> float:
    """Largest difference between the loop and the other strategies (they must agree)."""
    with torch.no_grad():
        reference = strategies["loop"](state)
        return max((fn(state) - reference).abs().max().item() for fn in strategies.values())


def per_sample_rows(name, model, mem, x):
    state = trained_state(mem, x.shape[0])
    strategies = per_sample_strategies(model, mem, x)
    error = check_agreement(strategies, state)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        wrap = with_backward if mode == "fwd+bwd" else None
        calls = {k: _bind_args(wrap(f) if wrap else f, state) for k, f in strategies.items()}
        with torch.set_grad_enabled(wrap is not None):
            times = median_times(calls)
        rows.append((name, mode, times, error))
    return rows


def _bind_args(fn, *args):
    return lambda: fn(*args)


def main() -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); batch {BATCH}, LoRA rank {RANK}\n"
    )
    print("per-sample LoRA: median CPU ms per call (ratio = time / batched time)")
    print(f"{'workload':<17} {'pass':<8} {'batched':>9} {'loop':>16} {'vmap':>16} {'max diff':>9}")
    workloads = [(f"linear T={n}", linear_workload, n) for n in (1, 8, 64)]
    workloads += [(f"transformer T={n}", transformer_workload, n) for n in (8, 64)]
    for name, make, tokens in workloads:
        for _, mode, t, err in per_sample_rows(name, *make(tokens)):
            b = t["batched"]
            print(
                f"{name:<17} {mode:<8} {b * 1e3:9.3f} "
                f"{t['loop'] * 1e3:8.3f} ({t['loop'] / b:4.1f}x) "
                f"{t['vmap'] * 1e3:8.3f} ({t['vmap'] / b:4.1f}x) {err:9.1e}"
            )
    print("\nbound forward overhead on the transformer: median CPU ms (ratio = time / bare model)")
    with torch.no_grad():
        times = median_times(overhead_variants())
    for variant, t in times.items():
        print(f"  {variant:<20} {t * 1e3:8.3f} ({t / times['bare model']:4.2f}x)")


# --------------------------------------------------------------- pytest-benchmark entries
def _per_sample_case(strategy, backward=False):
    model, mem, x = transformer_workload()
    state = trained_state(mem, BATCH)
    fn = per_sample_strategies(model, mem, x)[strategy]
    return (with_backward(fn) if backward else fn), state


def _run(benchmark, fn, *args, grad=False):
    """Forward passes run without autograd recording, as in the script's table."""
    with torch.set_grad_enabled(grad):
        benchmark.pedantic(fn, args=args, rounds=10, warmup_rounds=2, iterations=2)


def test_per_sample_lora_batched(benchmark):
    _run(benchmark, *_per_sample_case("batched"))


def test_per_sample_lora_loop(benchmark):
    _run(benchmark, *_per_sample_case("loop"))


def test_per_sample_lora_vmap(benchmark):
    _run(benchmark, *_per_sample_case("vmap"))


def test_per_sample_lora_batched_fwd_bwd(benchmark):
    _run(benchmark, *_per_sample_case("batched", backward=True), grad=True)


def test_per_sample_lora_loop_fwd_bwd(benchmark):
    _run(benchmark, *_per_sample_case("loop", backward=True), grad=True)


def test_bare_forward(benchmark):
    _run(benchmark, overhead_variants()["bare model"])


def test_bound_forward_shared(benchmark):
    _run(benchmark, overhead_variants()["bound shared"])


def test_bound_forward_per_sample(benchmark):
    _run(benchmark, overhead_variants()["bound per-sample"])


if __name__ == "__main__":
    main()
