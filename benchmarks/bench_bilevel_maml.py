"""One MAML meta-step: bilevel against higher, torchopt and a hand-batched bmm implementation.

The task (issue #3): 32 tasks, 5 inner SGD steps (lr 0.01), MLP 64-256-64 with ReLU, 25 support
and 25 query points per task, MSE, float32, the full second-order meta-gradient of the mean
query loss with respect to the shared initialisation. Every implementation computes the same
numbers (checked before timing, to 1e-4 relative in float32).

  * bilevel vmap:  ``vmap`` over tasks of ``bl.solve(..., mode=bl.Unrolled())``, then one
    ``torch.autograd.grad`` of the mean query loss (how the library is meant to be used);
  * bilevel loop:  the same ``bl.solve`` in a Python loop over tasks (eager autograd path);
  * higher:        ``higher.innerloop_ctx`` with ``torch.optim.SGD``, loop over tasks;
  * torchopt:      ``torchopt.sgd`` functional API with ``autograd.grad(create_graph=True)``,
    loop over tasks (its fastest documented pattern on CPU, see the anchors study);
  * bmm by hand:   all tasks at once with ``torch.baddbmm`` on per-task weight stacks and plain
    ``torch.autograd.grad(create_graph=True)``: the floor a library can aim for.

Optional (``--compile``, script mode only): ``torch.compile`` (inductor) of the bilevel
meta-gradient written with ``torch.func.grad``; cold compilation takes about a minute on CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_bilevel_maml.py [--compile] [--repeats 15]
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_bilevel_maml.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import bilevel as bl

TASKS, SHOTS, STEPS, LR = 32, 25, 5, 0.01
DIMS = (64, 256, 64)

warnings.filterwarnings("ignore", category=FutureWarning)  # torchopt's functorch notices


def make_problem(seed: int = 0):
    """The network (its parameters are the meta-parameters) and the task batch."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(DIMS[0], DIMS[1]), nn.ReLU(), nn.Linear(DIMS[1], DIMS[2]))
    xs, ys, xq, yq = (torch.randn(TASKS, SHOTS, d) for d in (DIMS[0], DIMS[2], DIMS[0], DIMS[2]))
    return net, (xs, ys, xq, yq)


def mse(out, y):
    return ((out - y) ** 2).mean()


# ----------------------------------------------------------------------- implementations
def bilevel_vmap(net, data):
    params = dict(net.named_parameters())

    def inner(p, meta, batch):
        x, y = batch
        return mse(torch.func.functional_call(net, p, (x,)), y)

    def task(x_s, y_s, x_q, y_q):
        adapted = bl.solve(inner, params, None, optimizer=bl.sgd(LR), steps=STEPS, data=(x_s, y_s))
        return inner(adapted, None, (x_q, y_q))

    loss = torch.func.vmap(task)(*data).mean()
    return torch.autograd.grad(loss, list(params.values()))


def bilevel_loop(net, data):
    params = dict(net.named_parameters())
    xs, ys, xq, yq = data

    def inner(p, meta, batch):
        x, y = batch
        return mse(torch.func.functional_call(net, p, (x,)), y)

    total = 0.0
    for i in range(TASKS):
        adapted = bl.solve(
            inner, params, None, optimizer=bl.sgd(LR), steps=STEPS, data=(xs[i], ys[i])
        )
        total = total + inner(adapted, None, (xq[i], yq[i]))
    return torch.autograd.grad(total / TASKS, list(params.values()))


def bilevel_func_grad(net, data):
    """The torch.func formulation (meta-gradient by ``torch.func.grad``); what gets compiled."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def inner(p, meta, batch):
        x, y = batch
        return mse(torch.func.functional_call(net, p, (x,)), y)

    def meta_loss(p, xs, ys, xq, yq):
        def task(x_s, y_s, x_q, y_q):
            adapted = bl.solve(inner, p, None, optimizer=bl.sgd(LR), steps=STEPS, data=(x_s, y_s))
            return inner(adapted, None, (x_q, y_q))

        return torch.func.vmap(task)(xs, ys, xq, yq).mean()

    return tuple(torch.func.grad(meta_loss)(params, *data).values())


def higher_loop(net, data):
    import higher

    xs, ys, xq, yq = data
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    total = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(TASKS):
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(STEPS):
                diffopt.step(mse(fnet(xs[i]), ys[i]))
            grads = torch.autograd.grad(mse(fnet(xq[i]), yq[i]) / TASKS, list(net.parameters()))
        total = [t + g for t, g in zip(total, grads)]
    return tuple(total)


def torchopt_loop(net, data):
    import torchopt

    xs, ys, xq, yq = data
    names, leaves = zip(*net.named_parameters())
    total = [torch.zeros_like(p) for p in leaves]
    for i in range(TASKS):
        opt = torchopt.sgd(LR)
        params = tuple(leaves)
        state = opt.init(params)
        for _ in range(STEPS):
            out = torch.func.functional_call(net, dict(zip(names, params)), (xs[i],))
            grads = torch.autograd.grad(mse(out, ys[i]), params, create_graph=True)
            updates, state = opt.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        out = torch.func.functional_call(net, dict(zip(names, params)), (xq[i],))
        grads = torch.autograd.grad(mse(out, yq[i]) / TASKS, leaves)
        total = [t + g for t, g in zip(total, grads)]
    return tuple(total)


def bmm_by_hand(net, data):
    xs, ys, xq, yq = data
    W1, b1, W2, b2 = (p for _, p in net.named_parameters())
    # per-task weight stacks, laid out for x @ W: (tasks, in, out) and biases (tasks, 1, out)
    fast = [
        W1.t().expand(TASKS, -1, -1),
        b1.expand(TASKS, 1, -1),
        W2.t().expand(TASKS, -1, -1),
        b2.expand(TASKS, 1, -1),
    ]

    def forward(w, x):
        return torch.baddbmm(w[3], torch.relu(torch.baddbmm(w[1], x, w[0])), w[2])

    for _ in range(STEPS):
        # sum over tasks of each task's mean loss: per-task gradients, no cross-task coupling
        loss = ((forward(fast, xs) - ys) ** 2).mean(dim=(1, 2)).sum()
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        fast = [w - LR * g for w, g in zip(fast, grads)]
    query = ((forward(fast, xq) - yq) ** 2).mean(dim=(1, 2)).mean()
    return torch.autograd.grad(query, [W1, b1, W2, b2])


IMPLEMENTATIONS = {
    "bilevel vmap": bilevel_vmap,
    "bilevel loop": bilevel_loop,
    "higher": higher_loop,
    "torchopt": torchopt_loop,
    "bmm by hand": bmm_by_hand,
}


def check_agreement(net, data, impls) -> float:
    """Max relative deviation of every implementation from the hand-batched reference."""
    reference = bmm_by_hand(net, data)
    worst = 0.0
    for name, fn in impls.items():
        for got, want in zip(fn(net, data), reference):
            rel = float((got - want).abs().max() / want.abs().max())
            if rel > 1e-4:
                raise AssertionError(f"{name} disagrees with the reference: rel. error {rel:.2e}")
            worst = max(worst, rel)
    return worst


# ----------------------------------------------------------------------------- pytest mode
def _bench(benchmark, name):
    net, data = make_problem()
    benchmark.group = "bilevel MAML meta-step (32 tasks, 5 SGD steps, MLP 64-256-64)"
    benchmark.pedantic(IMPLEMENTATIONS[name], args=(net, data), rounds=5, warmup_rounds=1)


def test_agreement():
    net, data = make_problem()
    assert (
        check_agreement(net, data, {**IMPLEMENTATIONS, "bilevel func.grad": bilevel_func_grad})
        < 1e-4
    )


def test_bilevel_vmap(benchmark):
    _bench(benchmark, "bilevel vmap")


def test_bilevel_loop(benchmark):
    _bench(benchmark, "bilevel loop")


def test_higher(benchmark):
    _bench(benchmark, "higher")


def test_torchopt(benchmark):
    _bench(benchmark, "torchopt")


def test_bmm_by_hand(benchmark):
    _bench(benchmark, "bmm by hand")


# ----------------------------------------------------------------------------- script mode
def interleaved_medians(impls, net, data, repeats: int) -> dict[str, float]:
    """Round-robin timing (so machine-load drift hits every implementation alike); medians, s."""
    for fn in impls.values():
        fn(net, data)  # warm-up
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            start = time.perf_counter()
            fn(net, data)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    net, data = make_problem()
    impls = dict(IMPLEMENTATIONS)
    if args.compile:
        compiled = torch.compile(bilevel_func_grad)
        start = time.perf_counter()
        compiled(net, data)
        print(f"torch.compile (inductor) first call: {time.perf_counter() - start:.1f} s")
        impls["bilevel compiled"] = compiled
    worst = check_agreement(net, data, impls)
    medians = interleaved_medians(impls, net, data, args.repeats)
    ours = medians["bilevel vmap"]
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"threads {torch.get_num_threads()}, repeats {args.repeats}; max rel. deviation {worst:.1e}"
    )
    print(f"{'implementation':<18} {'median ms':>10} {'x bilevel vmap':>15}")
    for name, seconds in sorted(medians.items(), key=lambda kv: kv[1]):
        print(f"{name:<18} {seconds * 1e3:>10.1f} {seconds / ours:>15.2f}")
    peers = min(medians["higher"], medians["torchopt"])
    print(
        f"speed-up of bilevel vmap over the faster peer: {peers / ours:.2f}x (target >= 2); "
        f"bilevel vmap / bmm by hand: {ours / medians['bmm by hand']:.2f}x (target <= 1.3)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
