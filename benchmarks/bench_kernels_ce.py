"""Fused masked-diffusion cross-entropy vs `F.cross_entropy` on the gathered masked rows.

Both compute sum_i w_i CE(W h_i, y_i) over N masked rows (hidden size D, vocabulary V) and its
gradients with respect to h and W (forward + backward), side by side in one process:

    baseline   logits = h @ W.T (N, V); F.cross_entropy(logits.float(), y, reduction="none") * w
               -- what `masked_diffusion_loss` does after gathering the masked rows;
    reference  `dd.kernels.linear_cross_entropy(..., backend="reference")`: chunked PyTorch;
    triton     the same with the Triton row kernel (CUDA only).

Reported: median time per forward + backward and the peak extra memory (bytes allocated beyond
the inputs), each as a ratio to the baseline. Issue targets on a GPU: >= 2x faster and >= 4x
less peak memory. Timings are interleaved round robin; on CPU they use process time (1 thread),
on CUDA wall time between synchronisations. CPU peak memory is the growth of the peak resident
set of a fresh subprocess per variant (Linux VmHWM after a reset through /proc/self/clear_refs);
CUDA peak memory comes from the caching allocator.

    OMP_NUM_THREADS=1 python benchmarks/bench_kernels_ce.py                  # CPU table
    python benchmarks/bench_kernels_ce.py --device cuda                      # GPU table
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_kernels_ce.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import diffusion as dd

VOCABS = (32_000, 126_464)  # a LLaMA-size vocabulary and LLaDA's
SHAPES = {  # (masked rows N, hidden size D) per device, and the dtype of h and W
    "cpu": ((512, 256), (2048, 256)),
    "cuda": ((8192, 4096), (16384, 2048)),  # LLaDA-8B's hidden size; a 1B-size model
}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def make_inputs(device: str, vocab: int, rows: int = 512, dim: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[device]
    hidden = (torch.randn(rows, dim, generator=g) / dim**0.5).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=g) * 0.02).to(device, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    row_weight = (1.0 / torch.rand(rows, generator=g).clamp(min=0.05)).to(device)  # 1 / t
    return hidden.requires_grad_(), weight.requires_grad_(), targets, row_weight


def baseline_loss(hidden, weight, targets, row_weight):
    logits = hidden @ weight.T
    return (F.cross_entropy(logits.float(), targets, reduction="none") * row_weight).sum()


def fused_loss(backend: str):
    def loss(hidden, weight, targets, row_weight):
        return dd.kernels.linear_cross_entropy(hidden, weight, targets, row_weight, backend=backend)

    return loss


def variants(device: str) -> dict:
    out = {"baseline": baseline_loss, "reference": fused_loss("reference")}
    if device == "cuda" and dd.kernels.triton_available():
        out["triton"] = fused_loss("triton")
    return out


def step(loss_fn, inputs):
    hidden, weight = inputs[0], inputs[1]
    loss = loss_fn(*inputs)
    loss.backward()
    hidden.grad = weight.grad = None
    return loss


def _clock(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_round_robin(functions: dict, inputs, device: str, repeats: int) -> dict:
    for fn in functions.values():
        step(fn, inputs)  # warm-up (kernel compilation, allocator)
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = _clock(device)
            step(fn, inputs)
            times[name].append(_clock(device) - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_peak_bytes(fn, inputs) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1])


def measure_rss_peak(name: str, vocab: int, rows: int, dim: int) -> int:
    """In this process: the peak resident-set growth of one forward + backward (Linux)."""
    inputs = make_inputs("cpu", vocab, rows, dim)
    fn = variants("cpu")[name]
    step(fn, make_inputs("cpu", 64))  # load the code paths once
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    step(fn, inputs)
    return (_status_kib("VmHWM") - before) * 1024


def cpu_peak_bytes(name: str, vocab: int, rows: int, dim: int) -> int:
    """`measure_rss_peak` in a fresh subprocess, so that no memory freed earlier is reused."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import bench_kernels_ce as b; "
        f"print(b.measure_rss_peak({name!r}, {vocab}, {rows}, {dim}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    return int(out.stdout.strip().splitlines()[-1])


def max_error(device: str, vocab: int, rows: int, dim: int) -> dict:
    """|loss - baseline| / baseline and the largest relative gradient error, per variant."""
    inputs = make_inputs(device, vocab, rows, dim)
    ref_loss = baseline_loss(*inputs)
    ref_grads = torch.autograd.grad(ref_loss, inputs[:2])
    errors = {}
    for name, fn in variants(device).items():
        loss = fn(*inputs)
        grads = torch.autograd.grad(loss, inputs[:2])
        rel = max(
            float((a.float() - b.float()).norm() / b.float().norm())
            for a, b in zip(grads, ref_grads)
        )
        loss, ref = float(loss.detach()), float(ref_loss.detach())
        errors[name] = (abs(loss - ref) / abs(ref), rel)
    return errors


def measure_case(device: str, rows: int, dim: int, vocab: int, repeats: int) -> list[dict]:
    inputs = make_inputs(device, vocab, rows, dim)
    functions = variants(device)
    times = time_round_robin(functions, inputs, device, repeats)
    if device == "cuda":
        peaks = {name: cuda_peak_bytes(fn, inputs) for name, fn in functions.items()}
    else:
        peaks = {name: cpu_peak_bytes(name, vocab, rows, dim) for name in functions}
    del inputs
    errors = max_error(device, vocab, rows, dim)
    out = []
    for name in functions:
        row = dict(
            rows=rows,
            dim=dim,
            vocab=vocab,
            variant=name,
            ms=1000 * times[name],
            speedup=times["baseline"] / times[name],
            peak_mib=peaks[name] / 2**20,
            memory_ratio=peaks["baseline"] / max(peaks[name], 1),
            loss_rel_err=errors[name][0],
            grad_rel_err=errors[name][1],
        )
        out.append(row)
        print(
            f"{rows:6d} {dim:5d} {vocab:7d} {name:10s} {row['ms']:9.1f} {row['speedup']:8.2f}x "
            f"{row['peak_mib']:9.1f} {row['memory_ratio']:8.2f}x "
            f"{row['loss_rel_err']:12.2e} {row['grad_rel_err']:12.2e}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = args.device
    hardware = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    print(
        f"torch {torch.__version__}, {hardware or platform.machine()}, "
        f"threads {torch.get_num_threads()}, {DTYPES[device]}"
    )
    columns = ("N", "D", "V", "variant", "ms", "speed-up", "peak MiB", "mem ratio")
    widths = (6, 5, 7, -10, 9, 9, 9, 9)
    header = " ".join(f"{c:>{w}s}" if w > 0 else f"{c:{-w}s}" for c, w in zip(columns, widths))
    print(f"{header} {'loss rel err':>12s} {'grad rel err':>12s}")
    results = []
    for rows, dim in SHAPES[device]:
        for vocab in VOCABS:
            results += measure_case(device, rows, dim, vocab, args.repeats)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


# pytest-benchmark: the CPU shapes at V = 32k (the reference path; no GPU needed)
def _bench(benchmark, name):
    inputs = make_inputs("cpu", VOCABS[0], *SHAPES["cpu"][0])
    fn = variants("cpu")[name]
    benchmark.pedantic(step, args=(fn, inputs), rounds=3, warmup_rounds=1)


def test_ce_baseline_v32k(benchmark):
    _bench(benchmark, "baseline")


def test_ce_fused_reference_v32k(benchmark):
    _bench(benchmark, "reference")


if __name__ == "__main__":
    main()
