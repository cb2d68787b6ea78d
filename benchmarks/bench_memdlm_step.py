"""Cost of a MemDLM training step relative to a standard step (issue 24's target: at most 1.40x).

Same model, same batch, same anchor; both steps include the backward pass and the optimizer
update. The two are timed interleaved in one process (round robin), and the ratio of medians is
reported, with the minor page faults per step. Variants: MemDLM with the per-step
fast-weights-off diagnostic (the recipe's default, `memdlm.gap_every=1`) and without it, and
per-sample fast weights. glibc's malloc thresholds are pinned as the recipe's CLI pins them
(`allocator.py`); `--glibc-default` measures without. `--flops` also counts each step's matmul
and attention FLOPs (`MatmulFlops`), whose ratio is the time ratio at an equal FLOP rate.

    OMP_NUM_THREADS=1 python benchmarks/bench_memdlm_step.py [--flops]  # table
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_memdlm_step.py --benchmark-only
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from recipes.memdlm import method
from recipes.memdlm.allocator import keep_freed_memory
from recipes.memdlm.backbones import adapter
from recipes.memdlm.build import new_model
from recipes.memdlm.config import build_config
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import prepare_data


def make_setup(preset: str = "cpu-tiny", batch_size: int = 32, n_layers: int | None = None):
    overrides = {"model": {"n_layers": n_layers}} if n_layers else None
    cfg = build_config(preset, overrides=overrides)
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=0, device="cpu")
    sampler = BatchSampler(data.train, batch_size, seed=0, eos_id=data.tokenizer.eos_id)
    batch = sampler.next()
    anchor = method.sample_anchor(
        batch, mask_id=data.tokenizer.mask_id, eps=1e-3, generator=torch.Generator().manual_seed(0)
    )
    return cfg, data, model, batch, anchor


def full_step(model):
    """`run(loss, parts)`: the rest of a training step after its loss, as the loop does it: the
    step record read back, backward, gradient clip, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def run(loss, parts):
        method.record_of(loss, parts)  # the step record, as the training loop reads it back
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def step_functions(cfg, data, model, batch, anchor):
    run = full_step(model)
    mask_id = data.tokenizer.mask_id
    backbone = adapter(model)  # resolved once, as `train_phase` does

    standard_method = method.Standard(mask_id)

    def standard():
        run(*standard_method.loss(backbone, method.Draws(batch, anchor)))

    def memdlm(memcfg, log_gap):
        memdlm_method = method.MemDLM.on(backbone, memcfg, mask_id=mask_id)
        generator = torch.Generator().manual_seed(1)

        def fn():
            draws = memdlm_method.draw_after(batch, anchor, generator)
            run(*memdlm_method.loss(backbone, draws, log_gap=log_gap))

        return fn

    per_sample = cfg.memdlm.model_copy(update={"per_sample": True})
    return {
        "standard": standard,
        "memdlm (gap logged)": memdlm(cfg.memdlm, True),
        "memdlm (no gap)": memdlm(cfg.memdlm, False),
        "memdlm per-sample (gap logged)": memdlm(per_sample, True),
    }


def time_round_robin(functions, repeats: int, warmup: int = 2):
    """Process (CPU) time per call: on a shared VM it is far less disturbed by preemption than
    wall time, and with one thread it is the work done (the kernel's page faults included).
    Returns ({name: seconds per call}, {name: minor page faults per call})."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    faults = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start, before = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            fn()
            times[name].append(time.process_time() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[name].append(after.ru_minflt - before.ru_minflt)
    return times, faults


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# torch's registry names the CUDA attention kernels; the CPU one counts by the same formulas
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        _cpu_attention_backward_flops
    ),
}


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of the matmul-like operators one call runs (mm, addmm, bmm, baddbmm,
    scaled dot-product attention, CPU's included, and their backward: torch's own formulas,
    `torch.utils.flop_counter`), elementwise work not counted. A dispatch mode only: unlike
    `FlopCounterMode` it installs no module hooks, so the step takes the path it takes untimed
    (hooks make `mm.output_of` call the module again)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _CPU_ATTENTION:
            self.total += _CPU_ATTENTION[packet](*args, **kwargs)
        elif packet in flop_registry:
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def print_flops(functions) -> None:
    """The matmul and attention FLOPs of one call of each function (`MatmulFlops`, after one
    call uncounted) and their ratio to the standard step's: the time ratio at an equal rate."""
    flops = {}
    for name, fn in functions.items():
        fn()
        with MatmulFlops() as counter:
            fn()
        flops[name] = counter.total
    print(f"{'step':32s} {'matmul+attention GFLOP':>22s} {'ratio':>7s}")
    for name, total in flops.items():
        print(f"{name:32s} {total / 1e9:22.3f} {total / flops['standard']:7.3f}")


def print_ratios(times, faults, width: int = 32) -> None:
    """The table: median ms per step, its ratio to the standard step's median, the ratio's
    interquartile range, and the median minor page faults per step."""
    base = statistics.median(times["standard"])
    print(
        f"{'step':{width}s} {'median ms':>10s} {'ratio':>7s} {'IQR of ratio':>14s} {'faults':>8s}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(
            f"{name:{width}s} {1000 * median:10.1f} {median / base:7.2f}   "
            f"{q1 / base:.2f}-{q3 / base:.2f} {statistics.median(faults[name]):10.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--layers", type=int, help="override model.n_layers")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's malloc thresholds as they are (the recipe's CLI pins them)",
    )
    parser.add_argument("--flops", action="store_true", help="also count each step's FLOPs")
    args = parser.parse_args()
    pinned = False if args.glibc_default else keep_freed_memory()
    cfg, data, model, batch, anchor = make_setup(args.preset, n_layers=args.layers)
    functions = step_functions(cfg, data, model, batch, anchor)
    times, faults = time_round_robin(functions, args.repeats)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {torch.get_num_threads()}, batch {tuple(batch.x0.shape)}, "
        f"preset {args.preset}, fast layers from "
        f"{method.first_fast_layer(adapter(model), cfg.memdlm)}"
        f" of {len(model.layers)}, glibc thresholds {'pinned' if pinned else 'default'}"
    )
    print_ratios(times, faults)
    if args.flops:
        print_flops(functions)


def test_standard_step(benchmark):
    setup = make_setup()
    benchmark(step_functions(*setup)["standard"])


def test_memdlm_step(benchmark):
    setup = make_setup()
    benchmark(step_functions(*setup)["memdlm (gap logged)"])


if __name__ == "__main__":
    main()
