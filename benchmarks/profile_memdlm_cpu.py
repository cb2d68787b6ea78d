"""Where a MemDLM training step spends its time on the CPU: by phase and by operator.

The `cpu-tiny` preset (model, data, batch 32) and full training steps: `memdlm_step`, backward,
gradient clipping and AdamW. Phases are timed exclusively (a phase's time excludes the phases
nested in it) by wrapping the recipe's functions:

    early layers             `model.hidden_states` (the anchor's, with grad; the pre-anchor
                             state's, without)
    inner forward            the inner loss: adapted layers, final norm, fused loss
    inner backward + update  the rest of `bilevel.solve`: autograd.grad, clipping, SGD
    fast-weight application  the LoRA hooks' forward (`B A x`), inside inner and outer forward
    outer forward            the outer loss with the adapted fast weights bound
    outer backward           `loss.backward()`
    optimizer                clipping, AdamW step, zero_grad
    diagnostics              the fast-weights-off loss (gap) and the `.item()` metrics
    other                    trajectory masks, fast-weight init, bookkeeping

The operator table comes from `torch.profiler` (self CPU time per step, top operators). Each
configuration also runs the standard step for scale. Times are process times, 1 thread.

    OMP_NUM_THREADS=1 python benchmarks/profile_memdlm_cpu.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import collections
import functools
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile

from recipes.memdlm import method
from recipes.memdlm.backbones import adapter
from recipes.memdlm.build import new_model
from recipes.memdlm.config import build_config
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.method import inner as method_inner
from recipes.memdlm.method import step as method_step

CONFIGS = {
    "default (shared LoRA r=8)": {},
    "per-sample LoRA r=8": {"per_sample": True},
    "per-sample LoRA r=32": {"per_sample": True, "rank": 32, "alpha": 64.0},
}


class PhaseTimer:
    """Exclusive time per phase: entering a phase pauses the enclosing one."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self._stack: list[list] = []  # [name, start, time spent in children]

    def __enter_phase(self, name):
        self._stack.append([name, time.process_time(), 0.0])

    def __exit_phase(self):
        name, start, children = self._stack.pop()
        elapsed = time.process_time() - start
        self.seconds[name] += elapsed - children
        if self._stack:
            self._stack[-1][2] += elapsed

    @property
    def current(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    def phase(self, name):
        timer = self

        class _Phase:
            def __enter__(self):
                timer._PhaseTimer__enter_phase(name)

            def __exit__(self, *exc):
                timer._PhaseTimer__exit_phase()
                return False

        return _Phase()

    def wrap(self, fn, name):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            if label is None:
                return fn(*args, **kwargs)
            with self.phase(label):
                return fn(*args, **kwargs)

        return wrapped


def instrument(timer: PhaseTimer, model, mem, monkey: list):
    """Wrap the recipe's functions with phases; `monkey` collects (owner, name, original)."""

    def patch(owner, name, label):
        original = getattr(owner, name)
        monkey.append((owner, name, original if name in vars(owner) else None))
        setattr(owner, name, timer.wrap(original, label))

    def head_label(*args, **kwargs):
        if timer.current == "inner forward":
            return None  # part of the inner loss
        return "outer forward" if torch.is_grad_enabled() else "diagnostics"

    original_make = method.make_inner_loss

    def make_inner_loss(*args, **kwargs):
        return timer.wrap(original_make(*args, **kwargs), "inner forward")

    monkey.append((method_inner, "make_inner_loss", original_make))
    method_inner.make_inner_loss = make_inner_loss
    patch(model, "hidden_states", "early layers")
    patch(method_inner, "solve_inner", "inner backward + update")
    patch(method_inner, "head_loss", head_label)
    patch(method_step, "head_loss", head_label)
    patch(method_step, "step_record", "diagnostics")
    patch(mem, "_output_delta", "fast-weight application")


def restore(monkey):
    """Undo `instrument`: module functions are put back, instance wrappers deleted."""
    for owner, name, original in reversed(monkey):
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def setup(overrides: dict):
    cfg = build_config("cpu-tiny")
    cfg = cfg.model_copy(update={"memdlm": cfg.memdlm.model_copy(update=overrides)})
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=0, device="cpu")
    sampler = BatchSampler(data.train, 32, seed=0, eos_id=data.tokenizer.eos_id)
    return cfg, data, model, sampler


def run_steps(cfg, data, model, sampler, steps: int, *, timer=None, memdlm=True):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    backbone = adapter(model)
    mask_id = data.tokenizer.mask_id
    if memdlm:
        step = method.MemDLM.on(backbone, cfg.memdlm, mask_id=mask_id)
    else:
        step = method.Standard(mask_id)
    mem = step.mem if memdlm else None
    generators = method.Generators(torch.Generator().manual_seed(0), torch.Generator())
    monkey: list = []
    timer = timer or PhaseTimer()
    if memdlm:
        instrument(timer, model, mem, monkey)
    total = 0.0
    try:
        for _ in range(steps):
            batch = sampler.next()
            start = time.process_time()
            with timer.phase("other"):
                draws = step.draw(batch, generators)
                if memdlm:
                    loss, parts = step.loss(backbone, draws, log_gap=True)
                    method.record_of(loss, parts)
                else:
                    with timer.phase("forward"):
                        loss, parts = step.loss(backbone, draws)
                        method.record_of(loss, parts)
                with timer.phase("outer backward" if memdlm else "backward"):
                    loss.backward()
                with timer.phase("optimizer"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            total += time.process_time() - start
    finally:
        restore(monkey)
        if mem is not None:
            mem.remove()
    return total / steps, {k: v / steps for k, v in timer.seconds.items()}


def op_table(cfg, data, model, sampler, steps: int, top: int):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(cfg, data, model, sampler, steps)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [
        (
            e.key,
            e.self_cpu_time_total / steps / 1000,
            e.self_cpu_time_total / total,
            e.count / steps,
        )
        for e in events[:top]
    ]
    # Per-sample fast weights are the only batched matmuls of the model (forward and backward).
    bmm = sum(e.self_cpu_time_total for e in events if e.key == "aten::bmm")
    return rows, total / steps / 1000, bmm / steps / 1000, bmm / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {torch.get_num_threads()}, preset cpu-tiny, batch 32, {args.steps} steps"
    )
    for label, overrides in CONFIGS.items():
        cfg, data, model, sampler = setup(overrides)
        run_steps(cfg, data, model, sampler, 2)  # warm-up
        standard, _ = run_steps(cfg, data, model, sampler, args.steps, memdlm=False)
        per_step, phases = run_steps(cfg, data, model, sampler, args.steps)
        ratio = per_step / standard
        print(f"\n## {label}: {1000 * per_step:.1f} ms/step")
        print(f"standard step {1000 * standard:.1f} ms; MemDLM / standard = {ratio:.2f}")
        print("\n| phase | ms/step | share |\n|---|---|---|")
        for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {1000 * seconds:.1f} | {seconds / per_step:.1%} |")
        rows, total_ms, bmm_ms, bmm_share = op_table(
            cfg, data, model, sampler, args.steps, args.top
        )
        print("\n| operator (self CPU) | ms/step | share | calls/step |\n|---|---|---|---|")
        for name, ms, share, calls in rows:
            print(f"| `{name}` | {ms:.2f} | {share:.1%} | {calls:.0f} |")
        print(f"| (all operators, profiled) | {total_ms:.1f} | 100% | |")
        if overrides.get("per_sample"):
            print(f"\nper-sample LoRA matmuls (`aten::bmm`, forward and backward): "
                  f"{bmm_ms:.2f} ms/step, {bmm_share:.1%} of operator time")  # fmt: skip


if __name__ == "__main__":
    main()
