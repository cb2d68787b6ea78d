"""Peak memory of a hypergradient as the number of inner steps grows: Unrolled vs Implicit.

Problem: learn a weight-decay coefficient (``meta``, a 0-d tensor) of a tanh MLP 128-512-128
regressed on 256 points (float32), inner SGD lr 0.05, K in {10, 25, 50, 100}; hypergradient of a
validation MSE. Modes: ``Unrolled()``, ``Implicit(CG(maxiter=20))``, and for context
``Truncated(10)`` and ``FirstOrder()``.

Two measurements, because CPU PyTorch has no ``max_memory_allocated``:

  * graph MiB: bytes of the tensors the autograd graph holds when ``solve`` returns (what the
    mode keeps for the backward pass), counted exactly with
    ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages, weakly tracked);
  * peak RSS MiB: in a fresh subprocess per configuration, one warm-up hypergradient, then the
    kernel's resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``) and a
    second hypergradient runs; reported is ``VmHWM`` after it minus ``VmRSS`` before it, i.e.
    the extra resident memory at the peak of forward + backward. The child runs with glibc's
    mmap threshold fixed at 64 KiB, so every tensor above that is ``mmap``-ed and returned to
    the OS when freed, and RSS follows the live tensors to about 1 MiB.

    OMP_NUM_THREADS=1 python benchmarks/bench_bilevel_memory.py
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_bilevel_memory.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

import bilevel as bl

SIZES, N_TRAIN, LR = (128, 512, 128), 256, 0.05
STEPS = (10, 25, 50, 100)
MODES = {
    "Unrolled": lambda: bl.Unrolled(),
    # damping keeps CG's system positive definite on this non-convex problem; the stationarity
    # check is off because this benchmark measures memory, not hypergradient accuracy
    "Implicit CG20": lambda: bl.Implicit(
        bl.CG(maxiter=20, damping=1.0), stationarity_rtol=float("inf")
    ),
    "Truncated(10)": lambda: bl.Truncated(10),
    "FirstOrder": lambda: bl.FirstOrder(),
}


def make_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_hidden, d_out = SIZES
    params0 = {
        "W1": torch.randn(d_hidden, d_in, generator=gen) / d_in**0.5,
        "W2": torch.randn(d_out, d_hidden, generator=gen) / d_hidden**0.5,
    }
    train = (torch.randn(N_TRAIN, d_in, generator=gen), torch.randn(N_TRAIN, d_out, generator=gen))
    val = (torch.randn(N_TRAIN, d_in, generator=gen), torch.randn(N_TRAIN, d_out, generator=gen))
    return params0, train, val


def predict(p, x):
    return torch.tanh(x @ p["W1"].T) @ p["W2"].T


def inner_loss(p, decay, data):
    x, y = data
    return ((predict(p, x) - y) ** 2).mean() + decay * sum((w**2).sum() for w in p.values())


def hypergradient(mode, steps: int, tracker=None):
    params0, train, val = make_problem()
    decay = torch.tensor(1e-3, requires_grad=True)
    hooks = (
        torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack)
        if tracker
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    )
    with hooks:
        params = bl.solve(
            inner_loss, params0, decay, optimizer=bl.sgd(LR), steps=steps, mode=mode, data=train
        )
    graph_bytes = tracker.live_bytes() if tracker else None
    x, y = val
    val_loss = ((predict(params, x) - y) ** 2).mean()
    if not val_loss.requires_grad:  # FirstOrder: nothing reaches decay, nothing to differentiate
        return None, graph_bytes
    (grad,) = torch.autograd.grad(val_loss, decay, allow_unused=True)
    return grad, graph_bytes


class SavedBytes:
    """Bytes of distinct storages saved for backward and still held by a live graph."""

    class _Handle:
        def __init__(self, tensor):
            self.tensor = tensor.detach()  # no node -> handle -> tensor -> node cycle

    def __init__(self):
        self.handles = weakref.WeakSet()

    def pack(self, tensor):
        handle = self._Handle(tensor)
        self.handles.add(handle)
        return handle

    @staticmethod
    def unpack(handle):
        return handle.tensor

    def live_bytes(self) -> int:
        storages = {}
        for handle in list(self.handles):
            storage = handle.tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


# glibc otherwise raises its mmap threshold after the first large free and keeps freed tensors in
# the heap, so a second run would reuse resident pages and hide its peak; a fixed 64 KiB
# threshold sends every tensor above it to mmap, returned to the OS on free.
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_child(mode_name: str, steps: int) -> float:
    """Run in a fresh process: extra resident memory at the peak of one hypergradient, MiB."""
    hypergradient(MODES[mode_name](), steps)  # warm-up: kernels, allocator, lazy imports
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    hypergradient(MODES[mode_name](), steps)
    return (_status_kib("VmHWM") - before) / 1024


def measure(mode_name: str, steps: int) -> dict:
    _, graph_bytes = hypergradient(MODES[mode_name](), steps, SavedBytes())
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode_name, str(steps)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **CHILD_MALLOC_ENV},
    )
    return {
        "graph_mib": graph_bytes / 2**20,
        "peak_rss_mib": json.loads(out.stdout)["peak_rss_mib"],
    }


# ----------------------------------------------------------------------------- pytest mode
@pytest.mark.parametrize("mode_name", ["Unrolled", "Implicit CG20"])
@pytest.mark.parametrize("steps", [10, 100])
def test_hypergradient(benchmark, mode_name, steps):
    benchmark.group = f"bilevel hypergradient memory/time, K={steps}"
    benchmark.extra_info.update(measure(mode_name, steps))
    benchmark.pedantic(hypergradient, args=(MODES[mode_name](), steps), rounds=3, warmup_rounds=1)


# ----------------------------------------------------------------------------- script mode
def main(argv=None) -> None:
    warnings.simplefilter("ignore", bl.BilevelWarning)  # see the note on MODES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.child:
        print(json.dumps({"peak_rss_mib": peak_rss_child(args.child[0], int(args.child[1]))}))
        return
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    print(f"{'mode':<15} {'K':>4} {'graph MiB':>10} {'peak RSS MiB':>13}")
    for mode_name in MODES:
        for steps in STEPS:
            m = measure(mode_name, steps)
            print(f"{mode_name:<15} {steps:>4} {m['graph_mib']:>10.1f} {m['peak_rss_mib']:>13.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
