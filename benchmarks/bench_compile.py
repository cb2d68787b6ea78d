"""Training throughput of the recipe's steps: eager vs `torch.compile`, logits vs fused loss.

The `cpu-tiny` preset's model and a batch of its training data (as `bench_memdlm_step.py`); each
step is forward, backward, gradient clipping and an AdamW update. Variants, timed interleaved
round robin in one process (median process time per step, 1 thread on CPU):

    standard / memdlm, logits     eager, `loss_backend=None`: full (B, L, V) logits, then the
                                  masked rows' cross-entropy (the code before issue 7);
    standard / memdlm, fused      eager, `loss_backend="auto"` (the default): only the masked
                                  rows are projected (`dd.masked_diffusion_loss_from_hidden`);
    standard / memdlm, compiled   `Standard/MemDLM.compiled()` (inductor), fused loss; the first
                                  step compiles, and its time is reported apart.

Ratios are to the eager logits step of the same method.

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py
    python benchmarks/bench_compile.py --device cuda
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_compile.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import statistics
import time

import torch

from recipes.memdlm import method
from recipes.memdlm.backbones import adapter
from recipes.memdlm.build import new_model
from recipes.memdlm.config import build_config
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import prepare_data


def make_setup(device: str = "cpu", preset: str = "cpu-tiny", batch_size: int = 32):
    cfg = build_config(preset)
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=0, device=device)
    sampler = BatchSampler(data.train, batch_size, seed=0, eos_id=data.tokenizer.eos_id)
    batch = sampler.next().to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    anchor = method.sample_anchor(
        batch, mask_id=data.tokenizer.mask_id, eps=1e-3, generator=generator
    )
    return cfg, data, model, batch, anchor


def step_functions(cfg, data, model, batch, anchor) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    mask_id = data.tokenizer.mask_id
    backbone = adapter(model)
    mem = method.make_fast_weights(backbone, cfg.memdlm)
    device = batch.x0.device

    def update(loss, parts):
        method.record_of(loss, parts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def standard(compiled=False, **options):
        step = method.Standard(mask_id, **options)
        step = step.compiled() if compiled else step
        return lambda: update(*step.loss(backbone, method.Draws(batch, anchor)))

    def memdlm(compiled=False, **options):
        generator = torch.Generator(device=device).manual_seed(1)
        step = method.MemDLM.on(backbone, cfg.memdlm, mask_id=mask_id, mem=mem, **options)
        step = step.compiled() if compiled else step

        def fn():
            draws = step.draw_after(batch, anchor, generator)
            update(*step.loss(backbone, draws, log_gap=True))

        return fn

    return {
        "standard, logits": standard(loss_backend=None),
        "standard, fused": standard(),
        "standard, compiled": standard(compiled=True),
        "memdlm, logits": memdlm(loss_backend=None),
        "memdlm, fused": memdlm(),
        "memdlm, compiled": memdlm(compiled=True),
    }


def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_round_robin(functions: dict, device, repeats: int):
    first = {}
    for name, fn in functions.items():
        start = _clock(device)
        fn()  # compiles the compiled variants
        first[name] = _clock(device) - start
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = _clock(device)
            fn()
            times[name].append(_clock(device) - start)
    return {name: statistics.median(v) for name, v in times.items()}, first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cfg, data, model, batch, anchor = make_setup(args.device)
    device = batch.x0.device
    medians, first = time_round_robin(
        step_functions(cfg, data, model, batch, anchor), device, args.repeats
    )
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(
        f"torch {torch.__version__}, {hardware or platform.machine()}, "
        f"threads {torch.get_num_threads()}, batch {tuple(batch.x0.shape)}, "
        f"{int(anchor.mask.sum())} masked of {int(batch.maskable.sum())} maskable tokens, "
        f"vocab {model.vocab_size}"
    )
    print(f"{'step':22s} {'ms/step':>9s} {'steps/s':>8s} {'ratio':>7s} {'first step s':>13s}")
    for name, median in medians.items():
        base = medians[name.split(",")[0] + ", logits"]
        print(
            f"{name:22s} {1000 * median:9.1f} {1 / median:8.2f} {base / median:6.2f}x "
            f"{first[name]:13.2f}"
        )


def _bench(benchmark, name):
    functions = step_functions(*make_setup())
    benchmark.pedantic(functions[name], rounds=5, warmup_rounds=2)


def test_standard_step_eager_fused(benchmark):
    _bench(benchmark, "standard, fused")


def test_standard_step_compiled(benchmark):
    _bench(benchmark, "standard, compiled")


if __name__ == "__main__":
    main()
