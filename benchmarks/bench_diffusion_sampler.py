"""Sampler cost and parallelism of `diffusion.generate`.

1. Overhead per step, excluding the model: `generate` driven by a "model" that returns cached
   logits (no compute) versus one forward of the reference `diffusion.Transformer` (d_model 256,
   the other sizes at their defaults: 4 layers, 4 heads, d_ff 256) on a length-512 sequence
   (prompt 64 + 448 generated), batch 1, for vocabularies of 256 (the recipe's byte-level size)
   and 4096. Target: overhead < 5% of a forward step.
2. Tokens committed per model call, threshold decoding vs one token per step, with an exact
   denoiser of a Markov chain (`MarkovOracle`: exact conditionals given the nearest revealed
   neighbours), so confidences mean something; the mean log-likelihood of the samples under the
   chain shows what the parallel commits cost in quality.

    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_sampler.py          # tables
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_diffusion_sampler.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import platform
import statistics
import time

import torch

import diffusion as dd

D_MODEL, PROMPT, GEN = 256, 64, 448


# ------------------------------------------------------------------------------ overhead
def reference_model(vocab: int) -> dd.Transformer:
    torch.manual_seed(0)
    return dd.Transformer(vocab, d_model=D_MODEL, max_seq_len=PROMPT + GEN).eval()


class CachedLogits:
    """Returns precomputed logits: `generate` then costs only its own bookkeeping."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


SAMPLER_CASES = {
    # name: generate keyword arguments (steps = model calls)
    "greedy, 1 block, 448 steps": dict(steps=GEN),
    "greedy, blocks of 32, 448 steps": dict(steps=GEN, block_length=32),
    "T=1 Gumbel, 1 block, 448 steps": dict(steps=GEN, temperature=1.0),
    "T=1 Gumbel, blocks of 32, 448 steps": dict(steps=GEN, block_length=32, temperature=1.0),
    "margin, blocks of 32, 448 steps": dict(steps=GEN, block_length=32, remasking="margin"),
}


def overhead_workload(vocab: int):
    model = reference_model(vocab)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab - 1, (1, PROMPT), generator=g)
    x = torch.cat([prompt, torch.full((1, GEN), vocab - 1)], 1)
    with torch.no_grad():
        logits = model(x)
    return model, prompt, x, CachedLogits(logits)


def forward_fn(model, x):
    def run():
        with torch.no_grad():
            return model(x)

    return run


def sampler_fn(cached, prompt, vocab, kwargs):
    def run():
        return dd.generate(
            cached,
            prompt,
            mask_id=vocab - 1,
            gen_length=GEN,
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        )

    return run


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def overhead_rows(vocab: int, rounds: int = 3) -> list[tuple[str, float, float, float]]:
    """(case, sampler ms per step, overhead ratio, forward ms). Each round times the forward
    (median of 3) right before one sampler run; the ratio is the median of the per-round ratios,
    which cancels slow drifts of the shared machine's load."""
    model, prompt, x, cached = overhead_workload(vocab)
    forward = forward_fn(model, x)
    rows = []
    for name, kwargs in SAMPLER_CASES.items():
        sampler = sampler_fn(cached, prompt, vocab, kwargs)
        forward_times, step_times = [], []
        for _ in range(rounds):
            forward_times.append(median_seconds(forward, rounds=3))
            step_times.append(median_seconds(sampler, rounds=1) / kwargs["steps"])
        ratio = statistics.median(s / f for s, f in zip(step_times, forward_times))
        rows.append(
            (
                name,
                1e3 * statistics.median(step_times),
                ratio,
                1e3 * statistics.median(forward_times),
            )
        )
    return rows


# ------------------------------------------------------------------------------ parallelism
class MarkovOracle:
    """Exact denoiser of a stationary first-order Markov chain over V tokens (mask id V).

    Given the revealed tokens, position i depends only on its nearest revealed neighbours a < i < b:
    p(x_i = v | ...) is proportional to (T^(i-a))[x_a, v] * (T^(b-i))[v, x_b], with the stationary
    distribution in place of the left factor when there is no left neighbour and 1 in place of
    the right factor when there is no right neighbour.
    """

    def __init__(self, vocab: int = 16, stay: float = 0.95, max_len: int = 512, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        successor = torch.randperm(vocab, generator=g)  # a random cycle of likely successors
        noise = torch.rand(vocab, vocab, generator=g, dtype=torch.float64)
        self.transition = (1 - stay) * noise / noise.sum(1, keepdim=True)
        self.transition[torch.arange(vocab), successor] += stay
        powers = [torch.eye(vocab, dtype=torch.float64)]
        for _ in range(max_len):
            powers.append(powers[-1] @ self.transition)
        self.powers = torch.stack(powers)  # (max_len + 1, V, V)
        self.stationary = powers[-1][0]
        self.vocab = vocab
        self.mask_id = vocab

    def sample(self, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.multinomial(self.stationary.expand(rows, -1), 1, generator=generator)
        for _ in range(length - 1):
            x = torch.cat(
                [x, torch.multinomial(self.transition[x[:, -1]], 1, generator=generator)], 1
            )
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        logp = self.stationary[x[:, 0]].log()
        return logp + self.transition[x[:, :-1], x[:, 1:]].log().sum(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape
        revealed = x != self.mask_id
        index = torch.arange(length).expand(batch, length)
        left = torch.where(revealed, index, -1).cummax(1).values  # nearest revealed at or before i
        right = torch.where(revealed, index, length).flip(1).cummin(1).values.flip(1)
        token = x.clamp(max=self.vocab - 1)
        left_tok = token.gather(1, left.clamp(min=0))
        right_tok = token.gather(1, right.clamp(max=length - 1))
        left_factor = torch.where(
            (left >= 0)[..., None],
            self.powers[(index - left).clamp(min=0, max=length), left_tok],
            self.stationary.expand(batch, length, -1),
        )
        right_factor = torch.where(
            (right < length)[..., None],
            self.powers[(right - index).clamp(min=0, max=length)]
            .gather(-1, right_tok[..., None, None].expand(batch, length, self.vocab, 1))
            .squeeze(-1),
            torch.ones(batch, length, self.vocab, dtype=torch.float64),
        )
        logits = (left_factor * right_factor).log()
        return torch.cat(
            [logits, torch.full((batch, length, 1), -torch.inf, dtype=torch.float64)], -1
        )


PARALLEL_CASES = {
    # name: generate keyword arguments; 128 generated tokens in blocks of 32
    "one token per step": dict(steps=128),
    "threshold 0.95": dict(steps=4, threshold=0.95),
    "threshold 0.9": dict(steps=4, threshold=0.9),
    "threshold 0.7": dict(steps=4, threshold=0.7),
    "threshold 0.5": dict(steps=4, threshold=0.5),
}


def parallelism_rows(rows: int = 64) -> list[tuple[str, float, float, int, float]]:
    """(case, temperature, tokens per call, model calls, mean log p per generated token)."""
    oracle = MarkovOracle()
    g = torch.Generator().manual_seed(0)
    prompt = oracle.sample(rows, 16, g)
    results = []
    for temperature in (0.0, 1.0):
        for name, kwargs in PARALLEL_CASES.items():
            out, stats = dd.generate(
                oracle,
                prompt,
                mask_id=oracle.mask_id,
                gen_length=128,
                block_length=32,
                temperature=temperature,
                generator=g,
                return_stats=True,
                **kwargs,
            )
            log_p = float((oracle.log_prob(out) - oracle.log_prob(prompt)).mean()) / 128
            results.append((name, temperature, stats.tokens_per_call, stats.model_calls, log_p))
    # The exact reference: one uniformly random position per step at T = 1 samples the chain itself.
    out = dd.generate(
        oracle,
        prompt,
        mask_id=oracle.mask_id,
        gen_length=128,
        steps=128,
        remasking="random",
        temperature=1.0,
        generator=g,
    )
    log_p = float((oracle.log_prob(out) - oracle.log_prob(prompt)).mean()) / 128
    results.append(("exact: random order, 1/step", 1.0, 1.0, 128, log_p))
    return results


# ------------------------------------------------------------------------------ script
def main() -> None:
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}"
    )
    for vocab in (256, 4096):
        print(f"\nSampler overhead per step, L = {PROMPT + GEN}, d_model = {D_MODEL}, V = {vocab}")
        print(f"{'case':40s} {'ms/step':>9s} {'forward ms':>11s} {'overhead':>9s}")
        for name, step_ms, ratio, forward_ms in overhead_rows(vocab):
            print(f"{name:40s} {step_ms:9.3f} {forward_ms:11.2f} {100 * ratio:8.2f}%")
    print("\nTokens per model call: Markov-chain oracle (V = 16, stay 0.95), 64 rows,")
    print("16-token prompts, 128 generated tokens in blocks of 32, low-confidence remasking")
    print(f"{'case':30s} {'T':>4s} {'tokens/call':>12s} {'calls':>6s} {'log p / token':>14s}")
    for name, temperature, per_call, calls, log_p in parallelism_rows():
        print(f"{name:30s} {temperature:4.1f} {per_call:12.2f} {calls:6d} {log_p:14.3f}")


# ------------------------------------------------------------------------------ pytest-benchmark
def _sampler_case(benchmark, vocab, name):
    _, prompt, _, cached = overhead_workload(vocab)
    benchmark.group = f"diffusion sampler V={vocab}"
    benchmark(sampler_fn(cached, prompt, vocab, SAMPLER_CASES[name]))


def test_forward_v256(benchmark):
    model, _, x, _ = overhead_workload(256)
    benchmark.group = "diffusion sampler V=256"
    benchmark(forward_fn(model, x))


def test_sampler_greedy_one_block_v256(benchmark):
    _sampler_case(benchmark, 256, "greedy, 1 block, 448 steps")


def test_sampler_greedy_blocks_v256(benchmark):
    _sampler_case(benchmark, 256, "greedy, blocks of 32, 448 steps")


def test_sampler_gumbel_one_block_v256(benchmark):
    _sampler_case(benchmark, 256, "T=1 Gumbel, 1 block, 448 steps")


def test_threshold_tokens_per_call(benchmark):
    rows = benchmark.pedantic(parallelism_rows, rounds=1, iterations=1)
    per_call = {f"{name}, T={t}": value for name, t, value, _, _ in rows}
    benchmark.extra_info.update(per_call)


if __name__ == "__main__":
    main()
