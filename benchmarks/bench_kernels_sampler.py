"""Sampler throughput: tokens per second with and without the fused sampler step, with a
compiled step, and with threshold decoding.

The model is the reference `diffusion.Transformer` with random weights whose logits are scaled
by `SHARPNESS` = 200, so that threshold decoding at 0.9 commits a few tokens per call (about 2.4
here; the exact Markov-chain denoiser of `bench_diffusion_sampler.py` gives 1.7 at T = 1). The
model's cost per call is real, its confidences are not: the number of calls under threshold
decoding depends on the model, and only the cost per call and the fixed-step rates carry over.
Gumbel sampling at temperature 1 with low-confidence remasking, semi-autoregressive blocks of 32.
Variants (same prompts, interleaved round robin):

    reference        `generate(..., backend="reference")`: the PyTorch proposal on the gathered
                     candidate rows (float32 copy, float64 Gumbel noise of the same size);
    fused            `backend="triton"`: the fused kernel (CUDA only; on CPU it would run in
                     Triton's interpreter, which measures nothing);
    compiled         `compiler=torch.compile` (inductor): model call and dense commit compiled;
                     its first call (compilation) is reported apart;
    ... threshold    the same with `threshold=0.9` (Fast-dLLM): steps end when a block is filled.

Tokens per second = generated tokens / median seconds per `generate` call; ratios are to the
reference with fixed steps. CPU times are process times (1 thread), CUDA times wall times.

    OMP_NUM_THREADS=1 python benchmarks/bench_kernels_sampler.py             # CPU table
    python benchmarks/bench_kernels_sampler.py --device cuda                 # GPU table
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_kernels_sampler.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import statistics
import time

import torch

import diffusion as dd

SHARPNESS = 200.0
CONFIGS = {
    "cpu": dict(
        batch=4, prompt=32, gen=128, block=32, vocab=4096, d_model=128, n_layers=2, d_ff=256
    ),
    "cuda": dict(
        batch=16,
        prompt=256,
        gen=256,
        block=32,
        vocab=126_464,
        d_model=1024,
        n_layers=8,
        d_ff=2816,
    ),  # fmt: skip
}


class Sharpened(torch.nn.Module):
    def __init__(self, model: dd.Transformer):
        super().__init__()
        self.model = model

    def forward(self, x):
        return SHARPNESS * self.model(x)


def workload(device: str):
    c = CONFIGS[device]
    torch.manual_seed(0)
    net = dd.Transformer(
        c["vocab"],
        d_model=c["d_model"],
        n_layers=c["n_layers"],
        n_heads=8 if c["d_model"] >= 512 else 4,
        d_ff=c["d_ff"],
        max_seq_len=c["prompt"] + c["gen"],
    )
    model = Sharpened(net).to(device).eval()
    if device == "cuda":
        model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c["vocab"] - 1, (c["batch"], c["prompt"]), generator=g).to(device)
    return model, prompt, c


def variants(device: str, c) -> dict[str, dict]:
    base = dict(
        mask_id=c["vocab"] - 1,
        gen_length=c["gen"],
        steps=c["gen"],
        block_length=c["block"],
        temperature=1.0,
    )
    out = {"reference": dict(base, backend="reference")}
    if device == "cuda" and dd.kernels.triton_available():
        out["fused"] = dict(base, backend="triton")
    out["compiled"] = dict(base, compiler=torch.compile)
    out["reference, threshold 0.9"] = dict(out["reference"], threshold=0.9)
    if "fused" in out:
        out["fused, threshold 0.9"] = dict(out["fused"], threshold=0.9)
    out["compiled, threshold 0.9"] = dict(out["compiled"], threshold=0.9)
    return out


def _clock(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def run(model, prompt, kwargs, seed=0):
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    return dd.generate(model, prompt, generator=generator, return_stats=True, **kwargs)


def measure(device: str, repeats: int):
    model, prompt, c = workload(device)
    cases = variants(device, c)
    first_call = {}
    for name, kwargs in cases.items():  # warm-up; compiled variants compile here
        start = _clock(device)
        run(model, prompt, kwargs)
        first_call[name] = _clock(device) - start
    times = {name: [] for name in cases}
    calls = {}
    for _ in range(repeats):
        for name, kwargs in cases.items():
            start = _clock(device)
            _, stats = run(model, prompt, kwargs)
            times[name].append(_clock(device) - start)
            calls[name] = stats.model_calls
    tokens = c["batch"] * c["gen"]
    rows = []
    base = statistics.median(times["reference"])
    for name in cases:
        median = statistics.median(times[name])
        rows.append((name, tokens / median, base / median, calls[name], first_call[name]))
    return c, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    c, rows = measure(args.device, args.repeats)
    hardware = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    print(
        f"torch {torch.__version__}, {hardware or platform.machine()}, "
        f"threads {torch.get_num_threads()}, config {c}"
    )
    print(
        f"{'variant':28s} {'tokens/s':>10s} {'ratio':>7s} {'calls':>6s} {'ms/call':>8s} "
        f"{'first call s':>13s}"
    )
    for name, rate, ratio, calls, first in rows:
        per_call = 1000 * c["batch"] * c["gen"] / rate / calls
        print(f"{name:28s} {rate:10.1f} {ratio:6.2f}x {calls:6d} {per_call:8.1f} {first:13.2f}")


def _bench(benchmark, name):
    model, prompt, c = workload("cpu")
    kwargs = variants("cpu", c)[name]
    benchmark.pedantic(run, args=(model, prompt, kwargs), rounds=2, warmup_rounds=1)


def test_sampler_reference_fixed_steps(benchmark):
    _bench(benchmark, "reference")


def test_sampler_reference_threshold(benchmark):
    _bench(benchmark, "reference, threshold 0.9")


if __name__ == "__main__":
    main()
